"""rqvae_ray: exact, distributed RQ-VAE semantic-ID batch inference for POIs on Ray Data.

The public names below are loaded on first use, so that Ray actors, which import submodules of this package, do not
pay for the driver-side imports (and ``import rqvae_ray`` stays free of pandas, pyarrow and torch).
"""

__version__ = "0.1.0"
_EXPORTS = {
    "BatchInferenceManager": "rqvae_ray.api.batch_inference",
    "BatchInferenceProcessor": "rqvae_ray.api.batch_inference",
    "ModelConfigParser": "rqvae_ray.api.batch_inference",
    "read_codebooks": "rqvae_ray.outputs.readers",
    "iter_codebooks": "rqvae_ray.outputs.readers",
    "results_frame": "rqvae_ray.cli.summary",
    "load_model": "rqvae_ray.api.model",
    "diff_codebooks": "rqvae_ray.cli.diff",
    "build_sid_stage": "rqvae_ray.api.ray_data",
    "SidStageConfig": "rqvae_ray.api.ray_data",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rqvae_ray' has no attribute {name!r}")
