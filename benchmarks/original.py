"""The original comp5331poi batch-inference algorithm, replayed for benchmarking (inference only).

Per model, in sequence, as the original ``BatchInferenceProcessor`` did: load the checkpoint with ``torch.load``,
build the RQ-VAE as ``nn.Module``s (encoder: Linear/BatchNorm1d/ReLU/Dropout blocks + ``proj``; residual quantizer
over ``quantizer.quantizers.{l}.vectors.weight``; decoder: Linear/ReLU), load the features tensor, iterate a torch
``DataLoader`` (batch size 128, no shuffling) through encoder + quantizer, build one dict per row
``{"Pid", "Codebook", "Vector"}`` into a DataFrame per batch, ``pd.concat`` them and ``to_csv(index=False)``.

Differences from the original, on purpose: eval mode and no gradient (the original ran its quantizer in train mode,
so its EMA codebook update changed the weights while it encoded), and files are written under ``--out-dir`` in the
product's layout instead of being uploaded.

Run: ``python -m benchmarks.original --hub-dir H --out-dir O [MODEL_ID ...]`` (default: the 10 published models).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.compare import output_file
from rqvae_ray.inputs.model_ids import parse_model_id

DEFAULT_MODELS = tuple(
    f"comp5331poi/rqvae-{dataset}-div{div}-commit{commit}-lr5e-5{suffix}"
    for dataset, commit in (("nyc", "0.5"), ("tky", "0.25"))
    for div, suffix in (("0.0", ""), ("0.25", ""), ("0.25", "-without_L_quant"), ("0.5", ""), ("0.75", ""))
)
BATCH_SIZE = 128


class Encoder(nn.Module):
    def __init__(self, input_dim: int, hidden_dims: list[int], latent_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.proj = nn.Linear(width, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.layers(x))


class Decoder(nn.Module):
    def __init__(self, latent_dim: int, hidden_dims: list[int], output_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.vectors = nn.Embedding(num_codes, dim)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", torch.zeros(num_codes, dim))

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.vectors.weight
        distances = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ weight.t() + weight.pow(2).sum(1)[None, :]
        indices = distances.argmin(dim=1)
        return indices, self.vectors(indices)


class ResidualQuantizer(nn.Module):
    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList([VectorQuantizer(size, dim) for size in sizes])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        for quantizer in self.quantizers:
            indices, vectors = quantizer(residual)
            codes.append(indices)
            quantized = quantized + vectors
            residual = residual - vectors
        return torch.stack(codes, dim=1), quantized


class RQVAE(nn.Module):
    def __init__(
        self, input_dim: int, hidden_dims: list[int], latent_dim: int, sizes: list[int], decoder_dims: list[int]
    ) -> None:
        super().__init__()
        self.encoder = Encoder(input_dim, hidden_dims, latent_dim)
        self.quantizer = ResidualQuantizer(sizes, latent_dim)
        self.decoder = Decoder(latent_dim, decoder_dims, input_dim)


def _numbered(state: dict, pattern: str) -> list[tuple[int, torch.Tensor]]:
    found = [(int(m.group(1)), v) for k, v in state.items() if (m := re.fullmatch(pattern, k))]
    return sorted(found, key=lambda item: item[0])


def build_model(state: dict[str, torch.Tensor]) -> RQVAE:
    """The RQ-VAE with the architecture read from the state dict's shapes, weights loaded, in eval mode."""
    encoder = [w for i, w in _numbered(state, r"encoder\.layers\.(\d+)\.weight") if w.ndim == 2]
    input_dim = encoder[0].shape[1]
    hidden = [w.shape[0] for w in encoder]
    latent = state["encoder.proj.weight"].shape[0]
    sizes = [w.shape[0] for _, w in _numbered(state, r"quantizer\.quantizers\.(\d+)\.vectors\.weight")]
    decoder = [w.shape[0] for _, w in _numbered(state, r"decoder\.layers\.(\d+)\.weight")][:-1]
    model = RQVAE(input_dim, hidden, latent, sizes, decoder)
    model.load_state_dict(state, strict=False)
    return model.eval()


class PoiDataset(Dataset):
    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.features[index]


def load_poi_features(path: Path) -> torch.Tensor:
    features = torch.load(path, map_location="cpu")
    if isinstance(features, dict):
        features = next(iter(features.values()))
    return features.float()


@torch.no_grad()
def process_model(model_id: str, hub_dir: Path, out_dir: Path) -> tuple[Path, int]:
    """Encode every POI with one model and write its codebooks CSV; returns (path, rows)."""
    spec = parse_model_id(model_id)
    checkpoint = torch.load(hub_dir / "models" / spec.org / spec.name / "rqvae_best.pt", map_location="cpu")
    model = build_model(checkpoint["model_state_dict"])
    features = load_poi_features(hub_dir / "datasets" / spec.dataset_repo / "RQVAE Dataset" / "poi_features.pt")
    loader = DataLoader(PoiDataset(features), batch_size=BATCH_SIZE, shuffle=False)
    frames = []
    pid = 1
    for batch in loader:
        z = model.encoder(batch)
        codes, quantized = model.quantizer(z)
        rows = []
        for i in range(len(batch)):
            rows.append({"Pid": pid, "Codebook": codes[i].tolist(), "Vector": quantized[i].tolist()})
            pid += 1
        frames.append(pd.DataFrame(rows))
    df = pd.concat(frames, ignore_index=True)
    path = output_file(out_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path, len(df)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.original", description=__doc__.splitlines()[0])
    parser.add_argument("model_ids", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--hub-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    for model_id in args.model_ids:
        started = time.perf_counter()
        path, rows = process_model(model_id, args.hub_dir, args.out_dir)
        print(f"{model_id}: {rows} rows in {time.perf_counter() - started:.2f}s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
