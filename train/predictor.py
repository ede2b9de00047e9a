"""The StoP predictor: I-JEPA's narrow ViT predictor with stochastic positions for the masked tokens.

Context token i enters as predictor_embed(s_i) + psi_i; masked token j as psi_j + predictor_embed(n_j) with
n_j ~ N(0, noise_std^2 I) in the encoder width. The noise thus goes through the same Linear that projects
the context (its weight is the noise covariance factor, tied so it cannot collapse to 0, and its bias is
the learned mask token). Each target block is predicted in its own sequence (context + that block), so
the predictor batch is len(target_masks) times the context batch, target-block-major as the official code.

State-dict keys and shapes are the official predictor's, so the `predictor` of a released checkpoint
loads with strict=True once `module.` is removed.
"""
from __future__ import annotations

import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from flexpredict_zoo.pos_embed import sincos_2d
from flexpredict_zoo.vision_transformer import gather_tokens

__all__ = ["StoPPredictor"]

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(masks: Masks, what: str) -> List[torch.Tensor]:
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    if not masks:
        raise ValueError(f"StoPPredictor needs at least one {what} mask")
    for m in masks:
        if m.dim() != 2:
            raise ValueError(f"{what} masks must be (B, K) index tensors, got shape {tuple(m.shape)}")
    return masks


class StoPPredictor(nn.Module):
    def __init__(self, num_patches: int, embed_dim: int, predictor_embed_dim: int = 384, depth: int = 6,
                 num_heads: int = 12, noise_std: float = 0.25, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, grid_size: Optional[Union[int, Tuple[int, int]]] = None,
                 init_std: float = 0.02):
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"noise_std is a standard deviation and must be >= 0, got {noise_std}")
        if grid_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"num_patches={num_patches} is not a square grid; pass grid_size=(rows, cols)")
            grid_size = (side, side)
        grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(f"grid_size {grid_size} does not hold num_patches={num_patches}")
        if predictor_embed_dim % num_heads:
            raise ValueError(f"predictor_embed_dim={predictor_embed_dim} is not divisible by num_heads={num_heads}")
        self.num_patches, self.embed_dim, self.grid_size = num_patches, embed_dim, grid_size
        self.predictor_embed_dim = predictor_embed_dim
        self.noise_std = float(noise_std)
        self.grad_checkpointing = False

        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        # Unused: the StoP mask token is predictor_embed(noise), whose bias plays this role. Kept because the
        # official predictor has the key, so its checkpoints load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        # Fixed sin-cos, never trained; a frozen Parameter (not a buffer) because that is the official key.
        self.predictor_pos_embed = nn.Parameter(sincos_2d(predictor_embed_dim, grid_size), requires_grad=False)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.predictor_blocks = nn.ModuleList([
            Block(predictor_embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=norm_layer) for i in range(depth)])
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        """As the official predictor: truncated normal Linear weights, zero biases, unit LayerNorms, and the
        residual projections of block i (1-based) scaled down by sqrt(2 i)."""
        trunc_normal_(self.mask_token, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer_id, block in enumerate(self.predictor_blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def sample_noise(self, rows: int, tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Fresh N(0, noise_std^2 I) noise in the encoder width, one vector per masked token."""
        return torch.randn(rows, tokens, self.embed_dim, device=device, dtype=dtype) * self.noise_std

    def forward(self, context_tokens: torch.Tensor, context_masks: Masks, target_masks: Masks,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """context_tokens (len(context_masks) * B, Kc, embed_dim) -> predictions (len(target_masks) * R, Kt, embed_dim)
        with R = len(context_masks) * B, target-block-major (block t, then context mask, then image).

        `noise` replaces the sampled noise (same shape as the output). Noise is drawn on every call, in
        train and eval mode alike, as in the official code (the predictor is not used at evaluation);
        pass `noise=torch.zeros(...)` or build with noise_std=0 for a deterministic prediction.
        """
        context_masks = _as_list(context_masks, "context")
        target_masks = _as_list(target_masks, "target")
        if context_tokens.dim() != 3 or context_tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"context_tokens must be (len(context_masks)*B, Kc, {self.embed_dim}), "
                             f"got {tuple(context_tokens.shape)}")
        device = context_tokens.device
        ctx_idx = torch.cat([m.to(device) for m in context_masks], dim=0)  # (R, Kc), context-mask-major
        if ctx_idx.shape != context_tokens.shape[:2]:
            raise ValueError(f"context masks {[tuple(m.shape) for m in context_masks]} do not match context_tokens "
                             f"{tuple(context_tokens.shape)} (rows = len(context_masks) * B, columns = Kc)")
        # compare shapes pairwise: hashing them in a set makes torch.compile specialise on every length
        if any(m.shape != target_masks[0].shape for m in target_masks[1:]):
            raise ValueError(f"all target masks must have the same (B, Kt) shape, got "
                             f"{[tuple(m.shape) for m in target_masks]}")
        n_ctx, n_tgt = len(context_masks), len(target_masks)
        batch, kt = target_masks[0].shape
        if batch * n_ctx != context_tokens.shape[0]:
            raise ValueError(f"target masks are for {batch} images but context_tokens has "
                             f"{context_tokens.shape[0]} rows for {n_ctx} context mask(s)")
        rows = n_tgt * n_ctx * batch

        pos = self.predictor_pos_embed.to(context_tokens.dtype)
        x = self.predictor_embed(context_tokens)
        x = x + gather_tokens(pos.expand(ctx_idx.shape[0], -1, -1), ctx_idx)

        # Target positions for every (block, context mask, image) row, pairing with x.repeat(n_tgt, 1, 1).
        tgt_idx = torch.stack([m.to(device) for m in target_masks])  # (n_tgt, B, Kt)
        tgt_idx = tgt_idx.unsqueeze(1).expand(n_tgt, n_ctx, batch, kt).reshape(rows, kt)
        pred = gather_tokens(pos.expand(rows, -1, -1), tgt_idx)
        if noise is None and self.noise_std == 0:
            pred = pred + self.predictor_embed.bias  # predictor_embed(0): the deterministic I-JEPA-with-bias token
        else:
            if noise is None:
                noise = self.sample_noise(rows, kt, device=device, dtype=context_tokens.dtype)
            elif noise.shape != (rows, kt, self.embed_dim):
                raise ValueError(f"noise must have shape {(rows, kt, self.embed_dim)} "
                                 f"(len(target_masks) * len(context_masks) * B, Kt, embed_dim), got {tuple(noise.shape)}")
            pred = pred + self.predictor_embed(noise.to(device))

        x = torch.cat([x.repeat(n_tgt, 1, 1), pred], dim=1)
        for block in self.predictor_blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.predictor_norm(x[:, -kt:])  # LayerNorm is per token: normalising only the outputs is the same
        return self.predictor_proj(x)
