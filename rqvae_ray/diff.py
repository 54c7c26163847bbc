"""``python -m rqvae_ray.diff``: the entry point of :mod:`rqvae_ray.cli.diff`."""

from rqvae_ray.cli.diff import main

if __name__ == "__main__":
    main()
