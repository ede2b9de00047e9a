"""An independent reference of the official StoP / I-JEPA ViT encoder, written from the architecture as the official code builds it.

It imports neither flexpredict_zoo nor timm, so the parity tests compare the registered timm model with
code that shares nothing with it: the position embedding is computed with numpy in float64 exactly as the
official `get_2d_sincos_pos_embed`, attention is computed by hand, and the weights come from an
official-format state dict (`module.` prefixes allowed). The file's `pos_embed` is ignored: the official
encoder's embedding is fixed, so the reference regenerates it for the grid it is built for.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) = [sin(pos * omega) | cos(pos * omega)], float64 like the official numpy code."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]]) -> np.ndarray:
    """(rows * cols, embed_dim) in float64. For a square grid this is the official function line for line; a
    (rows, cols) grid generalises it the only consistent way (meshgrid over the column then the row index)."""
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(rows, dtype=np.float64)
    grid_w = np.arange(cols, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # official quirk: w goes first, so the first half encodes the column
    grid = np.stack(grid, axis=0).reshape(2, 1, rows, cols)
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_first, emb_second], axis=1)


class ReferenceAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # the official code computes attention by hand
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ReferenceMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = ReferenceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ReferenceMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, H*W, D), row-major


class ReferenceEncoder(nn.Module):
    """The official encoder for a fixed (rows, cols) patch grid."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
                 img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.grid = (height // patch_size, width // patch_size)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        pos = get_2d_sincos_pos_embed(embed_dim, self.grid)
        # Official: a frozen parameter filled from the float64 numpy array cast to float32.
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([ReferenceBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    @classmethod
    def from_official(cls, state_dict: Mapping[str, torch.Tensor], num_heads: int,
                      img_size: Union[int, Tuple[int, int]] = 224) -> "ReferenceEncoder":
        """Build from an official encoder state dict (with or without `module.`); shapes give the architecture."""
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        embed_dim, in_chans, patch_size, _ = sd["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        model = cls(embed_dim, depth, num_heads, patch_size, img_size, in_chans, mlp_ratio)
        weights = {k: v for k, v in sd.items() if k != "pos_embed"}  # fixed embedding: regenerated, not read
        model.load_state_dict(weights, strict=True)
        return model.eval()

    def forward_tokens(self, x: torch.Tensor, masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """(B, C, H, W) -> final-normed tokens; masks (official `apply_masks`) keep the listed patch indices and
        concatenate the masks along the batch."""
        x = self.patch_embed(x)
        assert x.shape[1] == self.pos_embed.shape[1], "reference built for another grid"
        x = x + self.pos_embed
        if masks is not None:
            x = torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.shape[-1])) for m in masks], dim=0)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature: mean over all tokens after the final norm (the official evaluation)."""
        return self.forward_tokens(x).mean(dim=1)


def direct_pos_embed(embed_dim: int, rows: int, cols: int) -> np.ndarray:
    """Element-by-element sin-cos formula of the MAE/I-JEPA layout (no vectorisation), for spot checks."""
    d = embed_dim // 2
    out = np.zeros((rows * cols, embed_dim), dtype=np.float64)
    for r in range(rows):
        for c in range(cols):
            for k in range(d // 2):
                omega = 10000.0 ** (-k / (d / 2))
                out[r * cols + c, k] = math.sin(c * omega)
                out[r * cols + c, d // 2 + k] = math.cos(c * omega)
                out[r * cols + c, d + k] = math.sin(r * omega)
                out[r * cols + c, d + d // 2 + k] = math.cos(r * omega)
    return out
