"""An independent reference of the official StoP predictor, written from the method as the paper and the official code describe it.

Deliberately plain: explicit loops over target blocks and samples, attention written out by hand, its own
numpy sin-cos, float64 throughout. It reads an official-format predictor state dict (no `module.` prefix).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F


def numpy_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim): row-major tokens; first half encodes the column, second half the row; [sin | cos]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([one_d(dim // 2, cols.reshape(-1)), one_d(dim // 2, rows.reshape(-1))], axis=1)


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(sd, name, x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _block(sd, prefix, x, num_heads):
    n, d = x.shape
    h = _layer_norm(sd, prefix + "norm1", x)
    qkv = _linear(sd, prefix + "attn.qkv", h).reshape(n, 3, num_heads, d // num_heads)
    heads = []
    for head in range(num_heads):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        attn = torch.softmax(q @ k.T / (d // num_heads) ** 0.5, dim=-1)
        heads.append(attn @ v)
    x = x + _linear(sd, prefix + "attn.proj", torch.cat(heads, dim=1))
    h = _layer_norm(sd, prefix + "norm2", x)
    return x + _linear(sd, prefix + "mlp.fc2", F.gelu(_linear(sd, prefix + "mlp.fc1", h)))


def reference_predictor(state: Dict[str, torch.Tensor], context_tokens: torch.Tensor,
                        context_mask: torch.Tensor, target_masks: List[torch.Tensor], noise: torch.Tensor,
                        num_heads: int, use_state_pos_embed: bool = False) -> torch.Tensor:
    """One context mask. Returns (len(target_masks) * B, Kt, D_enc), target-block-major, float64."""
    sd = {k: v.double() for k, v in state.items()}
    depth = len({k.split(".")[1] for k in sd if k.startswith("predictor_blocks.")})
    width = sd["predictor_embed.weight"].shape[0]
    num_patches = sd["predictor_pos_embed"].shape[1]
    grid = int(round(num_patches ** 0.5))
    if use_state_pos_embed:
        psi = sd["predictor_pos_embed"][0]
    else:
        psi = torch.from_numpy(numpy_sincos_2d(width, grid))
    B = context_tokens.shape[0]
    outputs = []
    for t, target_mask in enumerate(target_masks):
        for b in range(B):
            ctx = _linear(sd, "predictor_embed", context_tokens[b].double()) + psi[context_mask[b]]
            masked = psi[target_mask[b]] + _linear(sd, "predictor_embed", noise[t * B + b].double())
            x = torch.cat([ctx, masked])
            for i in range(depth):
                x = _block(sd, f"predictor_blocks.{i}.", x, num_heads)
            x = _layer_norm(sd, "predictor_norm", x)[len(ctx):]
            outputs.append(_linear(sd, "predictor_proj", x))
    return torch.stack(outputs)
