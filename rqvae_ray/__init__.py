"""rqvae_ray: exact, distributed RQ-VAE semantic-ID batch inference for POIs on Ray Data."""

__version__ = "0.1.0"
