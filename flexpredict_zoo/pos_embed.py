"""Fixed 2-D sin-cos position embedding in the MAE / I-JEPA layout.

Tokens are in row-major order. The first half of the channels encodes the column index and the
second half the row index; each half of width d is [sin(p * omega) | cos(p * omega)] with
omega_k = 10000 ** (-k / (d / 2)). timm's ``build_sincos2d_pos_embed`` orders channels differently,
so the released weights need this exact function.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin | cos], computed in float64 like the official numpy code."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_size: Union[int, Tuple[int, int]], dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Position embedding of shape (1, rows * cols, embed_dim) for a grid of (rows, cols) patches."""
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    row_index = torch.arange(rows).repeat_interleave(cols)  # row-major token order
    col_index = torch.arange(cols).repeat(rows)
    emb = torch.cat([sincos_1d(embed_dim // 2, col_index), sincos_1d(embed_dim // 2, row_index)], dim=1)
    return emb.to(dtype=dtype, device=device).unsqueeze(0)
