"""The StoP method as one module: context encoder, EMA target encoder and predictor; `forward` -> loss.

As DINOv2's `SSLMetaArch`: the training loop (engine.Trainer), the compiler (compile.compile_model), DDP and the
benchmark (bench.py) all go through this module. The step, as the official StoP code computes it: targets are the layer-normed (no
affine) target-encoder tokens of the full image, gathered at each target block; the context encoder sees only the
context block; the StoP predictor predicts the target blocks; smooth-L1 loss. After the optimizer step,
`update_target` moves the target encoder towards the context encoder (EMA).

The three network calls of the step are the methods `encode_targets`, `encode_context` and `predict`;
compile.compile_model shadows them with compiled versions on the instance (same weights, same state dict).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

import flexpredict_zoo  # noqa: F401  (registers the zoo models with timm)
from flexpredict_zoo.checkpoints import load_file, mismatch_summary, strip_prefix
from flexpredict_zoo.vision_transformer import gather_tokens

from .config import ModelConfig, PredictorConfig
from .optim import param_groups
from .predictor import StoPPredictor
from .run_checkpoint import ResumeError

__all__ = ["StoPModel", "encoder_kwargs", "repeat_interleave_batch"]


def encoder_kwargs(model_cfg: ModelConfig) -> Dict[str, Any]:
    """timm.create_model kwargs of the encoder (also stored in checkpoints as `model_kwargs`, for export)."""
    return dict(model_cfg.kwargs, img_size=model_cfg.img_size, drop_path_rate=model_cfg.drop_path_rate)


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """Official `repeat_interleave_batch`: each chunk of `batch_size` rows repeated `repeat` times in place, so the
    targets line up with predictions made from several context masks (one view + expand, no Python loop)."""
    if repeat == 1:
        return x
    chunks = x.shape[0] // batch_size
    return x.view(chunks, 1, batch_size, *x.shape[1:]).expand(chunks, repeat, batch_size, *x.shape[1:]) \
        .reshape(chunks * repeat * batch_size, *x.shape[1:])


class StoPModel(nn.Module):
    """`context_encoder` (trained), `target_encoder` (its EMA, no gradients) and `predictor` (trained).

    `networks()` maps the checkpoint names (`encoder`, `target_encoder`, `predictor`, as the official StoP
    checkpoints) to the modules."""

    def __init__(self, context_encoder: nn.Module, predictor: nn.Module, target_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.context_encoder = context_encoder
        self.predictor = predictor
        if target_encoder is None:
            target_encoder = copy.deepcopy(context_encoder)
        self.target_encoder = target_encoder.requires_grad_(False)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, predictor_cfg: PredictorConfig) -> "StoPModel":
        """The configured zoo encoder (the class the zoo serves) and a StoP predictor sized for it."""
        encoder = timm.create_model(model_cfg.name, **encoder_kwargs(model_cfg))
        if model_cfg.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        p = predictor_cfg
        predictor = StoPPredictor(
            num_patches=encoder.patch_embed.num_patches, embed_dim=encoder.embed_dim, predictor_embed_dim=p.embed_dim,
            depth=p.depth, num_heads=p.num_heads or encoder.blocks[0].attn.num_heads, noise_std=p.noise_std,
            drop_path_rate=p.drop_path_rate, grid_size=tuple(encoder.patch_embed.grid_size))
        return cls(encoder, predictor)

    # ------------------------------------------------------------------------------------------- the step
    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens of the target encoder (static shapes)."""
        return self.target_encoder.forward_masked(images, None)

    def encode_context(self, images: torch.Tensor, context_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The context encoder on the kept tokens only (token count varies from batch to batch)."""
        return self.context_encoder.forward_masked(images, context_masks)

    def predict(self, context: torch.Tensor, context_masks: Sequence[torch.Tensor],
                target_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.predictor(context, context_masks, target_masks)

    @torch.no_grad()
    def compute_targets(self, images: torch.Tensor, target_masks: Sequence[torch.Tensor],
                        num_context_masks: int = 1) -> torch.Tensor:
        """layer_norm(target encoder(all tokens)) without affine, gathered at each target block, target-block-major."""
        h = self.encode_targets(images)
        h = F.layer_norm(h, (h.shape[-1],))
        h = torch.cat([gather_tokens(h, m) for m in target_masks], dim=0)
        return repeat_interleave_batch(h, images.shape[0], num_context_masks)

    def forward(self, images: torch.Tensor, context_masks: Sequence[torch.Tensor],
                target_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The smooth-L1 (beta 1) loss of predicting the target blocks from the context block (a device scalar)."""
        targets = self.compute_targets(images, target_masks, len(context_masks))
        context = self.encode_context(images, context_masks)
        predictions = self.predict(context, context_masks, target_masks)
        return self.loss(predictions, targets)

    @staticmethod
    def loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 (beta 1) between predicted and target tokens, in fp32."""
        return F.smooth_l1_loss(predictions.float(), targets.float(), beta=1.0)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * context: two multi-tensor kernels, no per-parameter loop."""
        target = list(self.target_encoder.parameters())
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, list(self.context_encoder.parameters()), alpha=1.0 - momentum)

    # ------------------------------------------------------------------------------------------- parameters
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's groups (optim.param_groups' rule) over the trained networks; the target encoder has none."""
        return param_groups([self.context_encoder, self.predictor])

    def trained_parameters(self) -> List[nn.Parameter]:
        return [p for m in (self.context_encoder, self.predictor) for p in m.parameters() if p.requires_grad]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for network in (self.context_encoder, self.target_encoder, self.predictor):
            network.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------------- checkpoints
    def networks(self) -> Dict[str, nn.Module]:
        return {"encoder": self.context_encoder, "target_encoder": self.target_encoder, "predictor": self.predictor}

    def networks_state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {name: network.state_dict() for name, network in self.networks().items()}

    def load_networks_state_dict(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for name, network in self.networks().items():
            network.load_state_dict(state[name])

    def load_official(self, path: Union[str, Path]) -> Dict[str, Any]:
        """Start from an official StoP training checkpoint: `encoder`, `predictor`, `target_encoder` (DDP `module.`
        keys), each loaded with strict=True. The encoders' fixed `pos_embed` is not a parameter here (it is
        regenerated exactly), so it is dropped. Returns the file's scalar metadata (epoch, loss, ...)."""
        ckpt = load_file(path)
        missing = [k for k in self.networks() if k not in ckpt]
        if missing:
            raise ResumeError(f"run.init_from={path} is not an official StoP training checkpoint: it has no "
                              f"{', '.join(missing)} (keys found: {', '.join(map(str, ckpt))})")
        for key, network in self.networks().items():
            state = {k: v for k, v in strip_prefix(ckpt[key]).items()
                     if not (network is not self.predictor and k == "pos_embed")}
            try:
                network.load_state_dict(state, strict=True)
            except RuntimeError:  # torch's message lists every key (54 lines for ViT-L into ViT-B): summarise it
                raise ResumeError(f"run.init_from={path}: `{key}` does not fit the configured model "
                                  f"({mismatch_summary(state, network.state_dict())}); set model.name and "
                                  f"predictor.depth/embed_dim to the checkpoint's architecture") from None
        return {k: v for k, v in ckpt.items() if isinstance(v, (int, float, str))}
