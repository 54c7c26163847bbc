"""An independent, straightforward RQ-VAE encoder for checking the product: torch modules built from the state dict.

It follows the published architecture literally (Linear, BatchNorm1d, ReLU, Dropout blocks, then the projection;
residual quantization by nearest codeword) in float64, in eval mode, with no shared code from ``rqvae_ray``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def build_encoder(state: dict[str, torch.Tensor]) -> tuple[nn.Module, list[torch.Tensor]]:
    """The encoder as an ``nn.Sequential`` and the codebooks, from a published-layout state dict."""
    blocks: list[nn.Module] = []
    index = 0
    while f"encoder.layers.{index}.weight" in state:
        weight = state[f"encoder.layers.{index}.weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data.copy_(weight)
        linear.bias.data.copy_(state[f"encoder.layers.{index}.bias"])
        norm = nn.BatchNorm1d(weight.shape[0])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(norm, name).data.copy_(state[f"encoder.layers.{index + 1}.{name}"])
        blocks += [linear, norm, nn.ReLU(), nn.Dropout(0.1)]
        index += 4
    proj_weight = state["encoder.proj.weight"]
    proj = nn.Linear(proj_weight.shape[1], proj_weight.shape[0])
    proj.weight.data.copy_(proj_weight)
    proj.bias.data.copy_(state["encoder.proj.bias"])
    model = nn.Sequential(*blocks, proj).double().eval()
    books = []
    level = 0
    while f"quantizer.quantizers.{level}.vectors.weight" in state:
        books.append(state[f"quantizer.quantizers.{level}.vectors.weight"].clone())
        level += 1
    return model, books


@torch.no_grad()
def reference_sids(state: dict[str, torch.Tensor], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [N, levels] and quantized vectors [N, latent] (float32) for every row of ``features``."""
    model, books = build_encoder(state)
    latent = model(torch.from_numpy(features).double())
    residual = latent.clone()
    codes = []
    vector = torch.zeros(latent.shape, dtype=torch.float32)
    for book in books:
        distances = ((residual[:, None, :] - book.double()[None, :, :]) ** 2).sum(-1)
        chosen = distances.argmin(dim=1)
        codes.append(chosen)
        residual = residual - book.double()[chosen]
        vector = vector + book[chosen]
    return torch.stack(codes, 1).numpy(), vector.numpy()
