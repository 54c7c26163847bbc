"""Model IDs: ``MODEL_ID[=ORG/DATASET]``, the published ``<org>/rqvae-<dataset>-div..-commit..-lr..[-flags]`` scheme,
and files of them.

A name in the scheme says its dataset (the repo ``<org>/<dataset>`` of the model's org) and its training settings;
any other model is paired with its dataset repo explicitly: ``myorg/poi-tokenizer-v2=myorg/gowalla-ca``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rqvae_ray.errors import InvalidModelIdError, InvalidModelIdsError, ModelsFileError

DEFAULT_ORG = "comp5331poi"

DEFAULT_MODELS: tuple[str, ...] = tuple(
    f"{DEFAULT_ORG}/rqvae-{dataset}-div{div}-commit{commit}-lr5e-5{suffix}"
    for dataset, commit in (("nyc", "0.5"), ("tky", "0.25"))
    for div, suffix in (("0.0", ""), ("0.25", ""), ("0.25", "-without_L_quant"), ("0.5", ""), ("0.75", ""))
)

MAX_NAME_LENGTH = 96  # the Hub's limit for an organisation or repo name
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# A name with exactly one of these as a '-'/'_'/'.'-separated token reads that dataset wherever the token stands:
# the rule of the IDs accepted before other datasets could be named, kept so that they keep their meaning.
_PUBLISHED_DATASETS = ("nyc", "tky")
_SCHEME = re.compile(r"rqvae-([^-]*)", re.IGNORECASE)
_NUMBER = r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
# A field's value runs to the next '-', except the '-' of an exponent such as 'lr5e-5'.
_FIELDS = {field: re.compile(rf"(?:^|-){field}((?:[^-]|(?<=[eE])-)*)") for field in ("div", "commit", "lr")}
_FLAGS = ("without_l_quant", "without_l_reconstruction", "withkl")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model ID says about a model; the training settings are ``None`` for a name outside the scheme."""

    model_id: str
    org: str
    name: str
    dataset: str
    dataset_org: str
    div_weight: float | None
    commitment_weight: float | None
    lr: float | None
    quant_weight: float | None
    recon_weight: float | None
    use_kl_divergence: bool | None

    @property
    def dataset_repo(self) -> str:
        """The dataset repo that holds this model's POI features, ``<dataset_org>/<dataset>``."""
        return f"{self.dataset_org}/{self.dataset}"


class SplitModelIds(NamedTuple):
    """The outcome of :func:`split_model_ids`."""

    specs: list[ModelSpec]  # the valid models, each once, in the order first given
    errors: dict[str, str]  # {bad ID as given (or model ID paired twice): one-line reason}
    duplicates: dict[str, int]  # {model ID given more than once: how many times}


def _check_name(model_id: str, what: str, part: str) -> None:
    """Reject what cannot be a path component or a Hub organisation or repo name."""
    if not part:
        reason = f"the {what} is empty"
    elif len(part) > MAX_NAME_LENGTH:
        reason = f"the {what} is {len(part)} characters long; the Hub allows at most {MAX_NAME_LENGTH}"
    elif part in (".", ".."):
        reason = f"the {what} {part!r} is a path, not a name"
    elif not _NAME_CHARS.fullmatch(part):
        reason = f"the {what} {part!r} may only use letters, digits, '.', '_', '-'"
    elif not part[0].isalnum():
        reason = f"the {what} {part!r} may only start with a letter or digit"
    elif ".." in part or "--" in part:
        reason = f"the {what} {part!r} may not contain '..' or '--' (the Hub forbids them)"
    elif part[-1] in ".-":
        reason = f"the {what} {part!r} may not end with '.' or '-' (the Hub forbids it)"
    elif part.lower().endswith(".git"):
        reason = f"the {what} {part!r} may not end with '.git' (the Hub forbids it)"
    else:
        return
    raise InvalidModelIdError(model_id, reason)


def _split_repo(model_id: str, text: str, form: str) -> tuple[str, str]:
    parts = text.split("/")
    if len(parts) != 2:
        raise InvalidModelIdError(model_id, f"{form} with exactly one '/'")
    return parts[0], parts[1]


def _published_datasets_in(name: str) -> list[str]:
    tokens = re.split(r"[-_.]", name.lower())
    return [d for d in _PUBLISHED_DATASETS if d in tokens]


def _in_scheme(name: str) -> bool:
    return _SCHEME.match(name) is not None or bool(_published_datasets_in(name))


def _is_field_or_flag(token: str) -> bool:
    lower = token.lower()
    return lower.startswith(tuple(_FIELDS)) or any(flag in lower for flag in _FLAGS)


def _scheme_dataset(name: str) -> str | None:
    """The dataset a name says: its only ``nyc``/``tky`` token, else the token after ``rqvae-``; ``None`` if neither."""
    named = _published_datasets_in(name)
    if len(named) == 1:
        return named[0]
    match = _SCHEME.match(name)
    if match is None or _is_field_or_flag(match.group(1)):
        return None
    token = match.group(1)
    return token.lower() if token.lower() in _PUBLISHED_DATASETS else token


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


def _settings(model_id: str, name: str) -> dict[str, float | bool | None]:
    """The training settings a name says: the scheme's defaults where it is silent, all ``None`` outside it."""
    if not _in_scheme(name):
        return dict.fromkeys(
            ("div_weight", "commitment_weight", "lr", "quant_weight", "recon_weight", "use_kl_divergence")
        )
    lower = name.lower()
    return {
        "div_weight": _number(model_id, "div", name, 0.25),
        "commitment_weight": _number(model_id, "commit", name, 0.25),
        "lr": _number(model_id, "lr", name, 5e-5),
        "quant_weight": 0.0 if "without_l_quant" in lower else 1.0,
        "recon_weight": 0.0 if "without_l_reconstruction" in lower else 1.0,
        "use_kl_divergence": "withkl" in lower,
    }


def parse_model_id(model_id: str) -> ModelSpec:
    """Parse one ``MODEL_ID[=ORG/DATASET]`` (a model ID is ``org/name``; a bare name gets the default org)."""
    model_text, paired, repo_text = model_id.strip().partition("=")
    model_text = model_text.strip()
    if "/" in model_text:
        org, name = _split_repo(model_id, model_text, "a model ID is 'org/name'")
    else:
        org, name = DEFAULT_ORG, model_text
    _check_name(model_id, "organisation", org)
    _check_name(model_id, "model name", name)
    if paired:
        if "=" in repo_text:
            raise InvalidModelIdError(model_id, "pair a model with one dataset repo: 'MODEL_ID=ORG/DATASET'")
        dataset_org, dataset = _split_repo(model_id, repo_text.strip(), "the dataset repo after '=' is 'ORG/DATASET'")
        _check_name(model_id, "dataset organisation", dataset_org)
    else:
        dataset_org, dataset = org, _scheme_dataset(name)
        if dataset is None:
            pairing = f"'{org}/{name}=ORG/DATASET'"
            if _in_scheme(name):
                reason = (
                    "the name must say its dataset right after 'rqvae-' (e.g. 'rqvae-nyc-div0.25-commit0.5-lr5e-5') "
                    f"or be paired with its dataset repo: {pairing}"
                )
            else:
                reason = (
                    f"the name does not follow the scheme 'rqvae-<dataset>-...'; pair it with its dataset: {pairing}"
                )
            raise InvalidModelIdError(model_id, reason)
    _check_name(model_id, "dataset name", dataset)
    return ModelSpec(
        model_id=f"{org}/{name}",
        org=org,
        name=name,
        dataset=dataset,
        dataset_org=dataset_org,
        **_settings(model_id, name),
    )


def split_model_ids(model_ids: list[str] | tuple[str, ...]) -> SplitModelIds:
    """Parse every ID: the valid specs (each model once, order kept), ``{bad id: reason}``, and the model IDs given
    more than once with their counts. A model paired with two dataset repos is an error naming both."""
    specs: dict[str, ModelSpec] = {}
    counts: dict[str, int] = {}
    repos: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for model_id in model_ids:
        try:
            spec = parse_model_id(model_id)
        except InvalidModelIdError as exc:
            errors[model_id] = str(exc)
            continue
        specs.setdefault(spec.model_id, spec)
        counts[spec.model_id] = counts.get(spec.model_id, 0) + 1
        seen = repos.setdefault(spec.model_id, [])
        if spec.dataset_repo not in seen:
            seen.append(spec.dataset_repo)
    for model_id, seen in repos.items():
        if len(seen) > 1:
            del specs[model_id]
            reason = f"paired with {len(seen)} dataset repos ({', '.join(seen)}); pair it with one"
            errors[model_id] = str(InvalidModelIdError(model_id, reason))
    duplicates = {model_id: count for model_id, count in counts.items() if count > 1 and model_id in specs}
    return SplitModelIds(list(specs.values()), errors, duplicates)


def parse_model_ids(model_ids: list[str] | tuple[str, ...]) -> list[ModelSpec]:
    """Parse every ID, raising one :class:`InvalidModelIdError` that reports all bad ones together."""
    specs, errors, _ = split_model_ids(model_ids)
    if errors:
        raise InvalidModelIdsError(errors)
    return specs


def read_models_file(path: str | Path) -> list[str]:
    """The ``MODEL_ID[=ORG/DATASET]`` entries of a models file: one per line, ``#`` comments and blank lines allowed.

    Raises :class:`ModelsFileError` if the file cannot be read, holds no entry, or has lines that do not parse (all
    of them named by line number, together)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ModelsFileError(str(path), f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise ModelsFileError(str(path), "is not UTF-8 text; write one model ID per line") from None
    entries: list[str] = []
    bad: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry = re.sub(r"\s*=\s*", "=", line.split("#", 1)[0].strip())
        if not entry:
            continue
        if len(entry.split()) > 1:
            bad[number] = f"{entry!r}: one MODEL_ID[=ORG/DATASET] per line"
            continue
        try:
            parse_model_id(entry)
        except InvalidModelIdError as exc:
            bad[number] = str(exc)
            continue
        entries.append(entry)
    if bad:
        reasons = "; ".join(f"line {number}: {reason}" for number, reason in bad.items())
        raise ModelsFileError(str(path), reasons, tuple(bad))
    if not entries:
        raise ModelsFileError(str(path), "holds no model IDs; write one MODEL_ID[=ORG/DATASET] per line")
    return entries


def group_by_dataset(specs: list[ModelSpec]) -> dict[tuple[str, str], list[ModelSpec]]:
    """Group models by their dataset repo ``(dataset_org, dataset)``, keeping order."""
    groups: dict[tuple[str, str], list[ModelSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.dataset_org, spec.dataset), []).append(spec)
    return groups
