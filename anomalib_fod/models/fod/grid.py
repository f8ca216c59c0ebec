"""The token grid: row-major coordinates and their 2D sine-cosine embedding (torch only).

Shared by the Transformers (``transformer.py``) and the context score (``context.py``), which the scoring layer
imports without anything of Lightning.
"""

from __future__ import annotations

import math

import torch


def grid_coordinates(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``(height * width, 2)`` float (row, column) coordinates of a row-major token grid."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def sincos_embedding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sine-cosine positional embedding.

    The first half of the channels encodes the column, the second half the row, each as
    interleaved sin/cos at geometrically spaced frequencies (base 10^4).

    Args:
        coords: ``(N, 2)`` (row, column) coordinates; fractional values are fine.
        dim: embedding size, a multiple of 4.

    Returns:
        ``(N, dim)`` embeddings.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(0, half, 2, device=coords.device, dtype=torch.float32) * (-math.log(1e4) / half))
    parts = []
    for axis in (1, 0):  # column first, then row
        angles = coords[:, axis : axis + 1].float() * freqs  # (N, half / 2)
        parts.append(torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(coords.shape[0], half))
    return torch.cat(parts, dim=-1)
