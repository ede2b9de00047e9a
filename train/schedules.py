"""Per-iteration schedules: learning rate (linear warmup, then cosine), weight decay (cosine), EMA momentum (linear).

All are pure functions of the iteration, so a resumed run gets the same values without any scheduler state.
The official schedulers step *before* each update (`step += 1` first), so the update of iteration i (0-based)
uses the official value at step i + 1; the EMA momentum generator yields its value for i before stepping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .config import OptimConfig


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # int(ipe_scale * epochs * iterations_per_epoch), as the official schedulers
    warmup_steps: int
    lr_start: float
    lr_peak: float
    lr_final: float
    wd_start: float
    wd_final: float
    ema_start: float
    ema_end: float
    constant_from_step: Optional[int] = None  # ViT-H: lr and wd frozen at their value from this iteration

    @classmethod
    def from_config(cls, cfg: OptimConfig, iterations_per_epoch: int) -> "Schedule":
        ipe = iterations_per_epoch
        constant = None if cfg.constant_from_epoch is None else int(cfg.constant_from_epoch * ipe)
        return cls(total_steps=int(cfg.ipe_scale * cfg.epochs * ipe), warmup_steps=int(cfg.warmup_epochs * ipe),
                   lr_start=cfg.lr_start, lr_peak=cfg.lr_peak, lr_final=cfg.lr_final, wd_start=cfg.wd_start,
                   wd_final=cfg.wd_final, ema_start=cfg.ema_start, ema_end=cfg.ema_end, constant_from_step=constant)

    def _frozen(self, iteration: int) -> int:
        if self.constant_from_step is not None and iteration > self.constant_from_step:
            return self.constant_from_step
        return iteration

    def lr(self, iteration: int) -> float:
        step = self._frozen(iteration) + 1
        if step < self.warmup_steps:
            return self.lr_start + (step / self.warmup_steps) * (self.lr_peak - self.lr_start)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))  # held past the end
        cosine = self.lr_final + (self.lr_peak - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.lr_final, cosine)

    def weight_decay(self, iteration: int) -> float:
        step = self._frozen(iteration) + 1
        progress = min(1.0, step / max(1, self.total_steps))
        wd = self.wd_final + (self.wd_start - self.wd_final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # clamp at the final value, on whichever side it lies (official CosineWDSchedule)
        return max(self.wd_final, wd) if self.wd_final <= self.wd_start else min(self.wd_final, wd)

    def momentum(self, iteration: int) -> float:
        step = min(iteration, self.total_steps)
        return self.ema_start + step * (self.ema_end - self.ema_start) / max(1, self.total_steps)
