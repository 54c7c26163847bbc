"""Presets for downstream trainers (``--for``): what each trainer's own loader reads, checked against its public code.

A preset turns on what its trainer needs (dedup codes, on every POI where the trainer decodes a fixed number of codes)
and names the files it reads, written beside the codebooks file. Each :class:`TrainerConvention` records where the
trainer reads each file and how its item ids map to our Pids; :func:`resolve_presets` applies the presets to the
other options and refuses an option that contradicts one, naming both; :func:`too_many_codes` says when a model's SIDs
are longer than a trainer takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from rqvae_ray.core.choices import parse_choices
from rqvae_ray.errors import OutputError


class Preset(str, Enum):
    """A downstream trainer whose loader the outputs are written for."""

    GNPR_SID = "gnpr-sid"
    GNPR_SID_V2 = "gnpr-sid-v2"
    LC_REC = "lc-rec"
    MINIONEREC = "minionerec"
    TIGER = "tiger"
    GRID = "grid"
    SID_GR = "sid-gr"

    @classmethod
    def parse(cls, text: str) -> frozenset[Preset]:
        """The presets named in a comma-separated list such as ``lc-rec,grid``."""
        return parse_choices(cls, text, "--for", "a preset")


class PresetFile(str, Enum):
    """A file written for a preset beside the codebooks file (named by ``outputs.layout.preset_filename``).

    * ``items-index-json``: ``codebooks-<model, dots as _>-items.index.json``, ``{"<Pid - 1>": ["<a_5>", ...]}``: the
      item-to-token map keyed by 0-based item ids; no dot before ``.index.json``, as MiniOneRec's ``TokenExtender``
      takes the dataset name up to the file name's first dot.
    * ``tiger-tensor``: ``codebooks-<model>.tiger.pt``, an int64 tensor ``[N, levels + 1]`` whose row i is Pid i+1.
    * ``gnpr-sid-v2-csv``: ``codebooks-<model>.gnpr-sid-v2.csv``, the codebooks CSV's rows under the header
      ``pid,sid,vector``.
    """

    ITEMS_INDEX_JSON = "items-index-json"
    TIGER_TENSOR = "tiger-tensor"
    GNPR_SID_V2_CSV = "gnpr-sid-v2-csv"


class Length(Enum):
    """Which POIs get a dedup code in the trainer's own convention."""

    SHARED = "only POIs that share an SID (unique SIDs keep their codes)"
    EVERY = "every POI (0 for a unique SID): it decodes a fixed number of codes"
    EITHER = "either"


@dataclass(frozen=True, kw_only=True)
class TrainerConvention:
    """What one trainer's loader reads: the dedup length it needs, whether it reads the codebooks CSV itself, the
    exports and preset files it opens, and, for ``--help`` and the README, where it reads them and its item ids."""

    preset: Preset
    trainer: str
    repo: str  # the public repository whose loader was read
    length: Length
    reads_codebooks_csv: bool = False
    exports: frozenset[str] = frozenset()  # Export values (core.contract imports this module)
    files: tuple[PresetFile, ...] = ()
    reads: str
    item_ids: str
    max_codes: int = 0  # the most codes per SID its loader takes (0: any number)
    longer: str = ""  # what its loader does with a longer SID


CONVENTIONS: dict[Preset, TrainerConvention] = {
    c.preset: c
    for c in (
        TrainerConvention(
            preset=Preset.GNPR_SID,
            trainer="GNPR-SID V1",
            repo="wds1996/GNPR-SID",
            length=Length.SHARED,
            reads_codebooks_csv=True,
            reads="the codebooks CSV (Pid,Codebook,Vector, as code/codebook.py writes it), read by V1's save_json and "
            "comp5331poi's llm_dataset_generator.py",
            item_ids="item id = Pid",
        ),
        TrainerConvention(
            preset=Preset.GNPR_SID_V2,
            trainer="GNPR-SID V2",
            repo="wds1996/GNPR-SID",
            length=Length.SHARED,
            files=(PresetFile.GNPR_SID_V2_CSV,),
            reads="codebooks-<model>.gnpr-sid-v2.csv (pid,sid,vector, as V2/SID/get_SID.py writes it), read by "
            "load_pid_to_code in V2/dataprocess/userSplit/get_sft_data.ipynb (at most 4 codes: <a_..> to <d_..>; "
            "a model of more than 3 quantizer levels fails before any work)",
            item_ids="pid = Pid",
            max_codes=4,
            longer="encode_item in get_sft_data.ipynb refuses a longer one and load_pid_to_code skips its POI",
        ),
        TrainerConvention(
            preset=Preset.LC_REC,
            trainer="LC-Rec",
            repo="RUCAIBox/LC-Rec",
            length=Length.EVERY,
            files=(PresetFile.ITEMS_INDEX_JSON,),
            reads="codebooks-<model, dots as _>-items.index.json, read by BaseDataset._load_data in data.py as "
            "<data_path>/<dataset>/<dataset><index_file> (copy it there as <dataset>.index.json); "
            "get_prefix_allowed_tokens_fn allows one set of tokens per position, so every SID has levels+1 codes",
            item_ids="item id = Pid - 1 (0-based, as in its .inter.json)",
        ),
        TrainerConvention(
            preset=Preset.MINIONEREC,
            trainer="MiniOneRec",
            repo="AkaliKong/MiniOneRec",
            length=Length.EITHER,
            files=(PresetFile.ITEMS_INDEX_JSON,),
            reads="codebooks-<model, dots as _>-items.index.json, given as --sid_index_path to sft.py (TokenExtender "
            "opens <dir>/<name up to the first dot>.index.json) and read by SidItemFeatDataset in data.py; "
            "constrained decoding (LogitProcessor.py) agrees with .prefixes.json",
            item_ids="item id = Pid - 1 (0-based, as rq/generate_indices.py numbers items)",
        ),
        TrainerConvention(
            preset=Preset.TIGER,
            trainer="TIGER",
            repo="EdoardoBotta/RQ-VAE-Recommender",
            length=Length.EVERY,
            files=(PresetFile.TIGER_TENSOR,),
            reads="codebooks-<model>.tiger.pt, int64 (N, levels+1), the table "
            "SemanticIdTokenizer.precompute_corpus_ids builds in modules/tokenizer/semids.py "
            "(assign it to tokenizer.cached_ids; "
            "_tokenize_seq_batch_from_cached indexes its rows by item id)",
            item_ids="item id = Pid - 1",
        ),
        TrainerConvention(
            preset=Preset.GRID,
            trainer="GRID",
            repo="snap-research/GRID",
            length=Length.EVERY,
            exports=frozenset({"tensor"}),
            reads="codebooks-<model>.sids.pt, int64 (levels+1, N), given as semantic_id_path (torch.load) and read "
            "by map_sparse_id_to_semantic_id (src/data/loading/components/pre_processing.py) as id_map.t() indexed by "
            "item id; "
            "set num_hierarchies to levels+1. Its own dedup (deduplicate_rows_in_tensor in src/utils/tensor_utils.py) "
            "numbers colliding items 0, 1, ... in item order and gives 0 to a unique SID, as --fixed-length does",
            item_ids="item id = Pid - 1",
        ),
        TrainerConvention(
            preset=Preset.SID_GR,
            trainer="NVIDIA SID-GR",
            repo="NVIDIA/recsys-examples",
            length=Length.EVERY,
            exports=frozenset({"tensor"}),
            reads="codebooks-<model>.sids.pt, int64 (levels+1, N), given as item_id_to_sid_mapping_tensor_path to "
            "SIDSequenceDataset (examples/commons/datasets/sid_sequence_dataset.py), which index_selects its columns "
            "by item id; num_hierarchies must equal its rows (levels+1), and a -1 would become another level's token",
            item_ids="item id = Pid - 1",
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """The options a run's presets lead to."""

    dedup: bool
    fixed_length: bool
    exports: frozenset[str]


def resolve_presets(
    presets: frozenset[Preset], *, dedup: bool, fixed_length: bool, csv: bool, exports: frozenset[str]
) -> Resolved:
    """Turn on what ``presets`` need (dedup; a code on every POI where one decodes a fixed number of codes; the
    exports they read); an option or a preset that contradicts another raises :class:`OutputError` naming both."""
    chosen = [CONVENTIONS[preset] for preset in Preset if preset in presets]
    every = [c for c in chosen if c.length is Length.EVERY]
    shared = [c for c in chosen if c.length is Length.SHARED]
    if shared and every:
        raise OutputError(
            f"--for {shared[0].preset.value} numbers only POIs that share an SID, as its authors' code does, and "
            f"--for {every[0].preset.value} decodes a fixed number of codes (a code on every POI); run them separately"
        )
    if shared and fixed_length:
        raise OutputError(
            f"--for {shared[0].preset.value} numbers only POIs that share an SID, as its authors' code does, and "
            "--fixed-length gives every POI a code; give one of them"
        )
    reading_csv = [c for c in chosen if c.reads_codebooks_csv]
    if reading_csv and not csv:
        raise OutputError(
            f"--for {reading_csv[0].preset.value} reads the codebooks CSV and --format parquet writes none; "
            "drop --format parquet"
        )
    return Resolved(
        dedup=dedup or bool(chosen),
        fixed_length=fixed_length or bool(every),
        exports=exports.union(*(c.exports for c in chosen)),
    )


def too_many_codes(presets: frozenset[Preset], levels: int, dedup: bool) -> str:
    """Why SIDs of ``levels`` quantizer levels (and a dedup code with ``dedup``) are longer than the loader of one of
    ``presets`` takes; "" when every one takes them."""
    extra = 1 if dedup else 0
    for c in CONVENTIONS.values():
        if c.preset in presets and 0 < c.max_codes < levels + extra:
            parts = f"{levels} quantizer levels" + (" and the dedup code" if dedup else "")
            return (
                f"--for {c.preset.value}: {c.trainer} takes SIDs of at most {c.max_codes} codes ({c.longer}) but "
                f"this model's {parts} give SIDs of up to {levels + extra}; run this model without --for "
                f"{c.preset.value}, or give a checkpoint of at most {c.max_codes - extra} levels"
            )
    return ""


def variable_length_warning(exports: frozenset[str], fixed_length: bool) -> str:
    """The warning for ``--export index-json`` or ``tensor`` without ``--fixed-length`` ("" when none is due)."""
    if fixed_length or not exports & {"index-json", "tensor"}:
        return ""
    names = ", ".join(c.trainer for c in CONVENTIONS.values() if c.length is Length.EVERY)
    return (
        f"--export {','.join(sorted(exports & {'index-json', 'tensor'}))} without --fixed-length: {names} decode a "
        "fixed number of codes and cannot decode these variable-length SIDs; add --dedup --fixed-length, or --for "
        "with the trainer's name"
    )


def presets_help() -> str:
    """Per preset, the files written and what reads them, and how item ids map to Pids (for ``--help``)."""
    lines = [f"{c.preset.value}: {c.trainer} ({c.repo}): {c.reads}; {c.item_ids}." for c in CONVENTIONS.values()]
    return " ".join(lines)
