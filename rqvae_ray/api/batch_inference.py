"""The original comp5331poi ``poi.rqvae.batch_inference`` API, on the same Ray pipeline as the CLI.

Switch by changing one import: ``from rqvae_ray import BatchInferenceManager, BatchInferenceProcessor,
ModelConfigParser``. Like the original, processing uploads to the Hub by default and reports failures without
raising; unlike it, SIDs never depend on batch order or size, and every call returns the per-model results.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from rqvae_ray.core.presets import variable_length_warning
from rqvae_ray.errors import InvalidModelIdError, RqvaeRayError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, ModelSpec, parse_model_id
from rqvae_ray.pipeline.options import check_setup, make_options
from rqvae_ray.pipeline.results import ModelResult
from rqvae_ray.runner import run_models

# The original system's order of its target models.
TARGET_MODELS = [DEFAULT_MODELS[i] for i in (5, 6, 8, 9, 4, 3, 1, 0, 2, 7)]


class ModelConfigParser:
    """Parses model IDs into the original system's configuration dict."""

    @staticmethod
    def parse_model_name(model_id: str) -> dict:
        """``dataset_name`` (NYC/TKY), ``div_weight``, ``commitment_weight``, ``lr``, ``quant_weight``,
        ``recon_weight``, ``use_kl_divergence`` and ``run_name`` of a model ID (``ValueError`` if invalid)."""
        spec = parse_model_id(model_id)
        return {
            "dataset_name": spec.dataset.upper(),
            "div_weight": spec.div_weight,
            "commitment_weight": spec.commitment_weight,
            "lr": spec.lr,
            "quant_weight": spec.quant_weight,
            "recon_weight": spec.recon_weight,
            "use_kl_divergence": spec.use_kl_divergence,
            "run_name": spec.name,
        }


class BatchInferenceProcessor:
    """Runs models through the Ray pipeline; uploads to the Hub unless only ``out_dir`` is wanted.

    The keyword options are those of the command line, checked as it checks them (see
    :func:`~rqvae_ray.pipeline.options.make_options`): ``fmt`` ("csv"/"parquet"), ``dedup``, ``fixed_length``,
    ``sid_tokens``, ``exports`` (names such as ``["index-json", "tensor"]``, or one comma-separated string),
    ``for_`` (trainers' presets such as ``["lc-rec", "grid"]``, or one comma-separated string), ``keep_existing``,
    ``max_per_sid``, ``executor`` ("auto"/"local"/"ray"), ``pools`` ("auto"/"dataset"/"model"), ``batch_size``,
    ``actors_per_pool``, ``min_actors``, ``max_actors``, ``cpus_per_actor``, ``gpus_per_actor``, ``actor_wait_s``,
    ``address``, ``revision``, ``dataset_revision``, ``force``, ``upload_retries``, ``retry_backoff_s``, and
    ``input_cache`` (a folder where decoded ``.pt`` inputs are kept between runs; none by default). Contradictory
    options raise :class:`~rqvae_ray.errors.OutputError`.
    """

    def __init__(
        self,
        hf_token: str | None = None,
        base_folder: str | None = None,
        hub_dir: str | Path | None = None,
        out_dir: str | Path | None = None,
        upload: bool | None = None,
        **options,
    ) -> None:
        """``options``: the keywords of :func:`~rqvae_ray.pipeline.options.make_options`."""
        if hf_token:
            # Read by huggingface_hub in this process and in the Ray processes started from it; never logged.
            os.environ["HF_TOKEN"] = hf_token
        # Made here, so that contradictory options raise at once; the hub directory is checked in run().
        self.options = make_options(
            hub_dir=hub_dir,
            out_dir=out_dir,
            upload=upload,
            base_folder=base_folder or os.getenv("HF_LLM_DATASET_DIR", "LLM Dataset"),
            **options,
        )
        output = self.options.output
        if warning := variable_length_warning(frozenset(e.value for e in output.exports), output.fixed_length):
            warnings.warn(warning, stacklevel=2)

    def run(self, specs: list[ModelSpec]) -> list[ModelResult]:
        """Run parsed models; raises an :class:`~rqvae_ray.errors.RqvaeRayError` for problems found before inference."""
        check_setup(self.options)
        return run_models(specs, self.options)

    def process_model(self, model_id: str) -> ModelResult:
        """Process one model; raises ``RuntimeError`` naming the reason when it fails."""
        result = self.run([parse_model_id(model_id)])[0]
        if not result.ok:
            raise RuntimeError(f"{model_id}: {result.error}")
        return result


class BatchInferenceManager:
    """Processes many models (all 10 published ones by default), reporting failures and carrying on."""

    def __init__(self, hf_token: str | None = None, base_folder: str | None = None, **options) -> None:
        """``options`` are :class:`BatchInferenceProcessor`'s."""
        self.hf_token = hf_token
        self.processor = BatchInferenceProcessor(hf_token, base_folder, **options)
        self.target_models = list(TARGET_MODELS)

    def process_models(self, model_list: list[str] | None = None) -> list[ModelResult]:
        """Process the given models (default: all targets) in one Ray run; returns one result per model."""
        specs, results = [], []
        for model_id in model_list or self.target_models:
            try:
                specs.append(parse_model_id(model_id))
            except InvalidModelIdError as exc:
                print(f"❌ Error processing {model_id}: {exc}")
                results.append(ModelResult(model_id, "", ok=False, error=str(exc)))
        try:
            results += self.processor.run(specs) if specs else []
        except RqvaeRayError as exc:
            print(f"❌ {exc}")
            return results + [ModelResult(s.model_id, s.dataset, ok=False, error=str(exc)) for s in specs]
        for result in results:
            print(f"✅ Completed model: {result.model_id}" if result.ok else f"❌ {result.model_id}: {result.error}")
        return results

    def process_single_model(self, model_id: str) -> ModelResult:
        """Process one model, reporting (not raising) a failure."""
        return self.process_models([model_id])[0]

    def get_model_list(self) -> list[str]:
        return self.target_models.copy()

    def get_nyc_models(self) -> list[str]:
        return [m for m in self.target_models if "nyc" in m.lower()]

    def get_tky_models(self) -> list[str]:
        return [m for m in self.target_models if "tky" in m.lower()]
