"""Model IDs: parsing the published ``<org>/rqvae-<dataset>-div..-commit..-lr..[-flags]`` names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rqvae_ray.errors import InvalidModelIdError, InvalidModelIdsError

DEFAULT_ORG = "comp5331poi"
DATASETS = ("nyc", "tky")

DEFAULT_MODELS: tuple[str, ...] = tuple(
    f"{DEFAULT_ORG}/rqvae-{dataset}-div{div}-commit{commit}-lr5e-5{suffix}"
    for dataset, commit in (("nyc", "0.5"), ("tky", "0.25"))
    for div, suffix in (("0.0", ""), ("0.25", ""), ("0.25", "-without_L_quant"), ("0.5", ""), ("0.75", ""))
)

_NAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NUMBER = r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
# A field's value runs to the next '-', except the '-' of an exponent such as 'lr5e-5'.
_FIELDS = {field: re.compile(rf"(?:^|-){field}((?:[^-]|(?<=[eE])-)*)") for field in ("div", "commit", "lr")}
_FLAGS = ("without_l_quant", "without_l_reconstruction", "withkl")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model ID says about a model."""

    model_id: str
    org: str
    name: str
    dataset: str
    div_weight: float
    commitment_weight: float
    lr: float
    quant_weight: float
    recon_weight: float
    use_kl_divergence: bool

    @property
    def dataset_repo(self) -> str:
        """The dataset repo that holds this model's POI features, ``<org>/<dataset>``."""
        return f"{self.org}/{self.dataset}"

    @property
    def csv_name(self) -> str:
        """File name of this model's output table (CSV)."""
        return f"codebooks-{self.name}.csv"


def _number(model_id: str, field: str, name: str, default: float) -> float:
    found = _FIELDS[field].findall(name)
    if not found:
        return default
    if len(found) > 1:
        raise InvalidModelIdError(model_id, f"'{field}' appears {len(found)} times; give it once")
    raw = found[0]
    if re.fullmatch(_NUMBER, raw) is None:
        example = "lr5e-5" if field == "lr" else f"{field}0.25"
        raise InvalidModelIdError(model_id, f"'{field}{raw}' is not a number like '{example}'")
    return float(raw)


def parse_model_id(model_id: str) -> ModelSpec:
    """Parse one model ID (``org/name``; a bare name gets the default org)."""
    text = model_id.strip()
    parts = text.split("/")
    if len(parts) == 1:
        org, name = DEFAULT_ORG, parts[0]
    elif len(parts) == 2:
        org, name = parts
    else:
        raise InvalidModelIdError(model_id, "a model ID is 'org/name' with exactly one '/'")
    for part in (org, name):
        if not _NAME_CHARS.match(part) or ".." in part:
            raise InvalidModelIdError(
                model_id, f"'{part}' may only use letters, digits, '.', '_', '-' (no '..', no leading symbol)"
            )
    lower = name.lower()
    tokens = set(re.split(r"[-_.]", lower))
    named = [d for d in DATASETS if d in tokens]
    if not named:
        raise InvalidModelIdError(model_id, "the name must say its dataset ('nyc' or 'tky'), e.g. rqvae-nyc-...")
    if len(named) > 1:
        raise InvalidModelIdError(model_id, "the name names both datasets; keep one of 'nyc' or 'tky'")
    return ModelSpec(
        model_id=f"{org}/{name}",
        org=org,
        name=name,
        dataset=named[0],
        div_weight=_number(model_id, "div", name, 0.25),
        commitment_weight=_number(model_id, "commit", name, 0.25),
        lr=_number(model_id, "lr", name, 5e-5),
        quant_weight=0.0 if "without_l_quant" in lower else 1.0,
        recon_weight=0.0 if "without_l_reconstruction" in lower else 1.0,
        use_kl_divergence="withkl" in lower,
    )


def split_model_ids(model_ids: list[str] | tuple[str, ...]) -> tuple[list[ModelSpec], dict[str, str]]:
    """Parse every ID: the valid specs (duplicates dropped, order kept) and ``{bad id: reason}``."""
    specs: dict[str, ModelSpec] = {}
    errors: dict[str, str] = {}
    for model_id in model_ids:
        try:
            spec = parse_model_id(model_id)
        except InvalidModelIdError as exc:
            errors[model_id] = str(exc)
            continue
        specs.setdefault(spec.model_id, spec)
    return list(specs.values()), errors


def parse_model_ids(model_ids: list[str] | tuple[str, ...]) -> list[ModelSpec]:
    """Parse every ID, raising one :class:`InvalidModelIdError` that reports all bad ones together."""
    specs, errors = split_model_ids(model_ids)
    if errors:
        raise InvalidModelIdsError(errors)
    return specs


def group_by_dataset(specs: list[ModelSpec]) -> dict[tuple[str, str], list[ModelSpec]]:
    """Group models by their dataset repo ``(org, dataset)``, keeping order."""
    groups: dict[tuple[str, str], list[ModelSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.org, spec.dataset), []).append(spec)
    return groups
