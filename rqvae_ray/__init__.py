"""rqvae_ray: exact, distributed RQ-VAE semantic-ID batch inference for POIs on Ray Data.

The original system's API is importable from here; it is loaded on first use so that Ray actors, which import
submodules of this package, do not pay for the driver-side imports.
"""

__version__ = "0.1.0"
__all__ = ["BatchInferenceManager", "BatchInferenceProcessor", "ModelConfigParser", "__version__", "read_codebooks"]


def __getattr__(name: str):
    if name in ("BatchInferenceManager", "BatchInferenceProcessor", "ModelConfigParser"):
        from rqvae_ray import api

        return getattr(api, name)
    if name == "read_codebooks":
        from rqvae_ray.readers import read_codebooks

        return read_codebooks
    raise AttributeError(f"module 'rqvae_ray' has no attribute {name!r}")
