"""``python -m rqvae_ray.run``: the driver entry point (also for ``ray job submit -- python -m rqvae_ray.run``)."""

from rqvae_ray.cli.app import main

if __name__ == "__main__":
    main()
