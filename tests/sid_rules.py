"""Independent, plain statements of the SID rules and of the exported files, for checking the product."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

from rqvae_ray.outputs.readers import read_codebooks

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dedup_rule(codes: list[list[int]], fixed_length: bool = False) -> list[list[int]]:
    """--dedup: POIs sharing an SID (every POI with --fixed-length) get 0, 1, 2, ... in Pid order."""
    counts = Counter(map(tuple, codes))
    seen: dict[tuple, int] = defaultdict(int)
    result = []
    for code in codes:
        key = tuple(code)
        if fixed_length or counts[key] > 1:
            result.append([*code, seen[key]])
            seen[key] += 1
        else:
            result.append(list(code))
    return result


def extended_rule(kept: list[list[int]], new: list[list[int]], fixed_length: bool = False) -> list[list[int]]:
    """--keep-existing --dedup: the kept codebooks as they are; then each new POI in Pid order gets, when earlier POIs
    share its SID, the largest code they hold + 1 (0 when none holds one); the first POI of an SID gets 0 when a
    later new POI shares it (or with --fixed-length), else no code."""
    levels = len(new[0]) if new else 0
    largest: dict[tuple, int] = {}  # SID -> largest dedup code held so far, -1 for none
    for code in kept:
        key = tuple(code[:levels])
        largest[key] = max(largest.get(key, -1), code[levels] if len(code) > levels else -1)
    later = Counter(map(tuple, new))
    result = [list(code) for code in kept]
    for code in new:
        key = tuple(code)
        later[key] -= 1
        if key in largest or fixed_length or later[key] > 0:
            largest[key] = largest.get(key, -1) + 1
            result.append([*code, largest[key]])
        else:
            largest[key] = -1
            result.append(list(code))
    return result


def tokens_of(code: list[int]) -> list[str]:
    return [f"<{LETTERS[level]}_{value}>" for level, value in enumerate(code)]


def assert_exports_match(folder: Path, codebooks_file: str, levels: int, dedup: bool, exports: set[str]) -> None:
    """Each exported file of ``codebooks_file`` holds what its rows say, and only the asked ones exist."""
    frame = read_codebooks(folder / codebooks_file)
    pids, codebooks = frame["Pid"].tolist(), [list(code) for code in frame["Codebook"]]
    assert pids == list(range(1, len(pids) + 1))
    stem = codebooks_file.rsplit(".", 1)[0]
    index_path, tensor_path = folder / f"{stem}.index.json", folder / f"{stem}.sids.pt"
    assert index_path.is_file() == ("index-json" in exports)
    assert tensor_path.is_file() == ("tensor" in exports)
    if "index-json" in exports:
        index = json.loads(index_path.read_text())
        assert list(index) == [str(pid) for pid in pids]
        assert list(index.values()) == [tokens_of(code) for code in codebooks]
    if "tensor" in exports:
        tensor = torch.load(tensor_path, weights_only=True)
        width = levels + (1 if dedup else 0)
        assert tensor.dtype == torch.int64 and tuple(tensor.shape) == (width, len(pids))
        assert tensor.T.tolist() == [code + [-1] * (width - len(code)) for code in codebooks]
    prefixes_path = folder / f"{stem}.prefixes.json"
    assert prefixes_path.is_file() == bool(dedup or exports)
    if prefixes_path.is_file():
        following: dict[str, set[int]] = defaultdict(set)
        for code in codebooks:
            for length in range(len(code)):
                following[",".join(map(str, code[:length]))].add(code[length])
        assert json.loads(prefixes_path.read_text()) == {key: sorted(codes) for key, codes in following.items()}
