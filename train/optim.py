"""AdamW with the official parameter groups: weight decay on weight matrices only."""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple, Union

import torch
from torch import nn

from .config import OptimConfig


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # official rule: biases and 1-D parameters (LayerNorm weights) are not decayed
    return "bias" in name or param.ndim == 1


def param_groups(modules: Sequence[nn.Module]) -> List[Dict]:
    """One decayed and one non-decayed group; frozen parameters (predictor_pos_embed) are left out entirely,
    so no optimizer state and no weight decay ever touch them."""
    decay: List[torch.Tensor] = []
    no_decay: List[torch.Tensor] = []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": 0.0, "wd_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "wd_exclude": True}]


def use_fused(cfg: OptimConfig, device: torch.device) -> bool:
    if cfg.fused == "auto":
        return device.type == "cuda"
    return bool(cfg.fused)


def build_optimizer(params: Union[Sequence[nn.Module], List[Dict]], cfg: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameter groups (as model.StoPModel.param_groups hands them out) or over the groups of modules."""
    groups = list(params) if params and isinstance(params[0], dict) else param_groups(params)
    fused = use_fused(cfg, device)
    kwargs = dict(lr=cfg.lr_start, betas=tuple(cfg.betas), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """The weight-decay schedule applies to the decayed group only; the other group stays at 0."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("wd_exclude", False):
            group["weight_decay"] = weight_decay
