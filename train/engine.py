"""The FlexPredict (StoP) train step and training loop.

Step (DESIGN.md section 3): targets are the layer-normed (no affine) target-encoder tokens of the full image,
gathered at each target block; the context encoder sees only the context block; the StoP predictor predicts the
target blocks; smooth-L1 loss; AdamW; EMA update of the target encoder. The loss stays on the device: the host
waits for it only every `run.log_every` iterations and at checkpoints, where a non-finite loss stops the run.
"""
from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import flexpredict_zoo  # noqa: F401  (registers the zoo models with timm)
from flexpredict_zoo.vision_transformer import gather_tokens

from . import distributed as dist_utils
from . import run_checkpoint
from .config import ConfigError, TrainConfig
from .logs import MetricsLog, format_progress, logger, memory_gb, setup_logging
from .optim import build_optimizer, set_hyperparameters
from .schedules import Schedule


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint was left as it was."""


class UnreadableDataError(RuntimeError):
    """Too many images could not be read."""


# ----------------------------------------------------------------------------------------------- pieces

class MaskedEncoder(nn.Module):
    """Routes `forward` to `forward_masked`, so DDP's forward (which arms the gradient all-reduce) is the one called."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, masks=None) -> torch.Tensor:
        return self.encoder.forward_masked(images, masks)


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """Official `repeat_interleave_batch`: each chunk of `batch_size` rows repeated `repeat` times in place, so the
    targets line up with predictions made from several context masks (one view + expand, no Python loop)."""
    if repeat == 1:
        return x
    chunks = x.shape[0] // batch_size
    return x.view(chunks, 1, batch_size, *x.shape[1:]).expand(chunks, repeat, batch_size, *x.shape[1:]) \
        .reshape(chunks * repeat * batch_size, *x.shape[1:])


def compute_targets(target_model: nn.Module, images: torch.Tensor, target_masks: Sequence[torch.Tensor],
                    num_context_masks: int = 1) -> torch.Tensor:
    """layer_norm(target encoder(all tokens)) without affine, gathered at each target block, target-block-major.
    `target_model` is the target encoder wrapped in MaskedEncoder (possibly compiled): (images, None) -> all tokens."""
    with torch.no_grad():
        h = target_model(images, None)
        h = F.layer_norm(h, (h.shape[-1],))
        h = torch.cat([gather_tokens(h, m) for m in target_masks], dim=0)
        return repeat_interleave_batch(h, images.shape[0], num_context_masks)


@torch.no_grad()
def ema_update(target_params: List[torch.Tensor], online_params: List[torch.Tensor], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, as two multi-tensor kernels (no per-parameter loop)."""
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("run.precision=fp16 needs a CUDA GPU (gradient scaling); on CPU use fp32 or bf16")
        return "fp32" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


class CollateWithUnreadable:
    """DataLoader collate: drop unreadable samples (passing their names on), then build the multi-block masks.
    Also returns the mask generator's state right after this batch, so a checkpoint can resume it exactly."""

    def __init__(self, mask_collator):
        self.mask_collator = mask_collator

    def __call__(self, batch):
        from .data import filter_unreadable
        good, bad = filter_unreadable(batch)
        bad = [(str(b.path), str(b.error)) for b in bad]
        if not good:
            return None, None, None, bad, None
        collated, context_masks, target_masks = self.mask_collator(good)
        return collated, context_masks, target_masks, bad, self.mask_collator.state_dict()


def _loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    # A generator of its own for worker seeds, so building a loader never draws from the global RNG
    # (a resumed run must see the global RNG exactly where the uninterrupted run had it).
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + rank)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: Optional[Dataset] = None,
                 env: Optional[dist_utils.DistEnv] = None):
        self.cfg = cfg
        self.env = env or dist_utils.init_distributed(cfg.run.device)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.output_dir).expanduser()
        if self.env.is_main:
            run_checkpoint.checkpoint_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(self.env)
        setup_logging(self.run_dir if self.env.is_main else None, self.env.is_main, self.env.rank)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        # identical initial weights on every rank; per-rank randomness (noise, masks, augmentation) after
        _seed_everything(cfg.run.seed)
        self.model_kwargs = dict(cfg.model.kwargs, img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path_rate)
        self.encoder = timm.create_model(cfg.model.name, **self.model_kwargs).to(self.device)
        if cfg.model.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.predictor = self._build_predictor().to(self.device)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.init_info = None
        if cfg.run.init_from:
            self.init_info = run_checkpoint.load_official(cfg.run.init_from, self.encoder, self.predictor,
                                                          self.target_encoder)
        _seed_everything(cfg.run.seed + self.env.rank)

        self.optimizer = build_optimizer([self.encoder, self.predictor], cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.context_model = dist_utils.wrap_ddp(MaskedEncoder(self.encoder), self.env)
        self.predictor_model = dist_utils.wrap_ddp(self.predictor, self.env)
        self.target_model = MaskedEncoder(self.target_encoder)
        self.compile_counter = None
        if cfg.run.compile:
            # token dims marked dynamic: one graph per network for every mask length (see compile.py)
            from .compile import compile_trainer
            self.compile_counter = compile_trainer(self)
        self._online_params = list(self.encoder.parameters())
        self._target_params = list(self.target_encoder.parameters())
        self._trained_params = [p for m in (self.encoder, self.predictor) for p in m.parameters() if p.requires_grad]

        self.dataset = dataset if dataset is not None else self._build_dataset()
        self.mask_collator = self._build_mask_collator()
        self.sampler = dist_utils.ResumableDistributedSampler(
            self.dataset, num_replicas=self.env.world_size, rank=self.env.rank, seed=cfg.run.seed, shuffle=True,
            drop_last=cfg.data.drop_last)
        batches = self.sampler.num_samples // cfg.data.batch_size if cfg.data.drop_last else \
            math.ceil(self.sampler.num_samples / cfg.data.batch_size)
        if batches < 1:
            raise ConfigError(f"the dataset has {len(self.dataset)} images, {self.sampler.num_samples} per process: "
                              f"fewer than data.batch_size={cfg.data.batch_size}; lower the batch size")
        ipe = cfg.optim.iterations_per_epoch or batches
        if ipe > batches:
            raise ConfigError(f"optim.iterations_per_epoch={ipe} is more than the {batches} batches per epoch of "
                              f"this dataset and world size; lower it or leave it null")
        self.iterations_per_epoch = ipe
        self.schedule = Schedule.from_config(cfg.optim, ipe)
        self.total_iterations = cfg.optim.epochs * ipe
        if cfg.run.max_steps is not None:
            self.total_iterations = min(self.total_iterations, cfg.run.max_steps)

        self._data_loader: Optional[DataLoader] = None
        self.iteration = 0
        self.mask_state_after_last_batch = None
        self.unreadable: Dict[str, str] = {}
        self.resumed_from = None
        self._resume()
        if self.env.is_main:
            cfg.save(self.run_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------- builders
    def _build_predictor(self) -> nn.Module:
        from .predictor import StoPPredictor
        p = self.cfg.predictor
        heads = p.num_heads or self.encoder.blocks[0].attn.num_heads
        return StoPPredictor(num_patches=self.encoder.patch_embed.num_patches, embed_dim=self.encoder.embed_dim,
                             predictor_embed_dim=p.embed_dim, depth=p.depth, num_heads=heads, noise_std=p.noise_std,
                             drop_path_rate=p.drop_path_rate, grid_size=tuple(self.encoder.patch_embed.grid_size))

    def _build_dataset(self) -> Dataset:
        from .data import build_pretraining_dataset
        return build_pretraining_dataset(self.cfg.data, self.cfg.model.img_size, train=True)

    def _build_mask_collator(self):
        from .masks import MaskConfig, MultiBlockMaskCollator
        fields = {k: v for k, v in self.cfg.to_dict()["mask"].items() if v is not None}
        for key in ("target_scale", "target_aspect", "context_scale", "context_aspect"):
            fields[key] = tuple(fields[key])
        patch = self.encoder.patch_embed.patch_size
        mask_cfg = MaskConfig(input_size=tuple(self.encoder.patch_embed.img_size), patch_size=patch[0], **fields)
        # seed + rank: the collator draws sizes and places from (seed, counter), so equal seeds would give every
        # rank the same masks; distinct seeds keep the masks of a global batch independent.
        return MultiBlockMaskCollator(mask_cfg, seed=self.cfg.run.seed + self.env.rank)

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        """One DataLoader for the whole run (persistent workers); the sampler is told the epoch and how many of its
        batches are already done before each pass, in the main process, so the order is the same as without a stop."""
        d = self.cfg.data
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_index(start_batch * d.batch_size)
        if self._data_loader is None:
            self._data_loader = DataLoader(
                self.dataset, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.num_workers,
                collate_fn=CollateWithUnreadable(self.mask_collator), drop_last=d.drop_last,
                pin_memory=d.pin_memory and self.device.type == "cuda", persistent_workers=d.num_workers > 0,
                generator=_loader_generator(self.cfg.run.seed, epoch, self.env.rank))
        return self._data_loader

    # ------------------------------------------------------------------------------------------- step
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images: torch.Tensor, context_masks: Sequence[torch.Tensor],
                   target_masks: Sequence[torch.Tensor], iteration: int) -> torch.Tensor:
        """One update; returns the loss as a detached device tensor (no host sync)."""
        lr, wd, momentum = (self.schedule.lr(iteration), self.schedule.weight_decay(iteration),
                            self.schedule.momentum(iteration))
        set_hyperparameters(self.optimizer, lr, wd)
        with self.autocast():
            targets = compute_targets(self.target_model, images, target_masks, len(context_masks))
            context = self.context_model(images, context_masks)
            predictions = self.predictor_model(context, context_masks, target_masks)
            loss = F.smooth_l1_loss(predictions.float(), targets.float(), beta=1.0)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trained_params, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self._target_params, self._online_params, momentum)
        return loss.detach()

    def _to_device(self, images, context_masks, target_masks):
        nb = self.device.type == "cuda"
        return (images.to(self.device, non_blocking=nb), [m.to(self.device, non_blocking=nb) for m in context_masks],
                [m.to(self.device, non_blocking=nb) for m in target_masks])

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        ipe, total = self.iterations_per_epoch, self.total_iterations
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main)
        self.losses: List[float] = []
        self._window: List[torch.Tensor] = []
        self._window_values: List[float] = []
        self._window_images = 0
        self._last_time = time.perf_counter()
        start_time, start_iteration = self._last_time, self.iteration
        self._start_time = start_time
        logger.info("training %s on %s (%s, %d process%s), %d iterations/epoch, iterations %d..%d, run dir %s",
                    cfg.model.name, self.device, self.precision, self.env.world_size,
                    "es" if self.env.world_size > 1 else "", ipe, self.iteration, total, self.run_dir)
        try:
            while self.iteration < total:
                epoch = self.iteration // ipe
                start_batch = self.iteration - epoch * ipe
                for batch in self._loader(epoch, start_batch):
                    collated, context_masks, target_masks, bad, mask_state = batch
                    self._count_unreadable(bad, collated)
                    images = collated[0] if isinstance(collated, (list, tuple)) else collated
                    images, context_masks, target_masks = self._to_device(images, context_masks, target_masks)
                    loss = self.train_step(images, context_masks, target_masks, self.iteration)
                    self.iteration += 1
                    self.mask_state_after_last_batch = mask_state
                    self._window.append(loss)
                    self._window_images += images.shape[0]
                    done_epoch = self.iteration % ipe == 0
                    if self.iteration % cfg.run.log_every == 0 or self.iteration == total:
                        self._log(epoch)
                    keep = cfg.run.keep_every is not None and self.iteration % cfg.run.keep_every == 0
                    if self.iteration % cfg.run.checkpoint_every == 0 or keep or self.iteration == total:
                        self._save(epoch, keep=keep or self.iteration == total)
                    if done_epoch or self.iteration >= total:
                        break
        finally:
            self.metrics.close()
        dist_utils.barrier(self.env)
        wall = time.perf_counter() - start_time
        steps = self.iteration - start_iteration
        return {
            "iterations": self.iteration, "steps_this_run": steps, "epochs": self.iteration / ipe,
            "iterations_per_epoch": ipe, "final_loss": self.losses[-1] if self.losses else None,
            "losses": list(self.losses), "wall_s": wall,
            "images_per_second": steps * cfg.data.batch_size * self.env.world_size / wall if wall > 0 else None,
            "run_dir": str(self.run_dir), "checkpoint": str(run_checkpoint.checkpoint_dir(self.run_dir) / "latest.pt"),
            "resumed_from": self.resumed_from, "unreadable_images": len(self.unreadable), "precision": self.precision,
            "world_size": self.env.world_size,
        }

    def _count_unreadable(self, bad: List[Tuple[str, str]], collated) -> None:
        for path, error in bad:
            if path not in self.unreadable:
                self.unreadable[path] = error
                logger.warning("skipped unreadable image %s: %s", path, error)
        limit = self.cfg.data.max_unreadable_fraction * self.sampler.num_samples
        if len(self.unreadable) > limit:
            raise UnreadableDataError(
                f"{len(self.unreadable)} unreadable images on rank {self.env.rank}, more than "
                f"data.max_unreadable_fraction={self.cfg.data.max_unreadable_fraction} of its "
                f"{self.sampler.num_samples} images (first: {next(iter(self.unreadable))}). Fix or remove the files, "
                f"or raise data.max_unreadable_fraction")
        if collated is None:
            raise UnreadableDataError(f"every image of a batch at iteration {self.iteration} was unreadable "
                                      f"({', '.join(p for p, _ in bad[:3])}, ...); check data.root")

    def _drain(self) -> None:
        """The host sync: move the pending losses to the host (averaged over ranks) and stop on a non-finite one."""
        if not self._window:
            return
        losses = dist_utils.all_reduce_mean(torch.stack(self._window).float())
        values = losses.tolist()
        first = self.iteration - len(values) + 1
        self._window.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at iteration {first + offset} (after iteration {first + offset - 1}); training "
                    f"stopped and no checkpoint was written after it: the last good one is "
                    f"{run_checkpoint.checkpoint_dir(self.run_dir) / 'latest.pt'}. Lower optim.lr_peak, set "
                    f"optim.clip_grad, or use run.precision=fp32/bf16, then resume")
        self.losses.extend(values)
        self._window_values.extend(values)

    def _log(self, epoch: int) -> None:
        self._drain()
        now = time.perf_counter()
        elapsed = now - self._last_time
        it = self.iteration - 1  # the iteration whose hyperparameters were just used
        row = dict(iteration=self.iteration, epoch=epoch, loss=float(np.mean(self._window_values)),
                   loss_last=self._window_values[-1], lr=self.schedule.lr(it), weight_decay=self.schedule.weight_decay(it),
                   momentum=self.schedule.momentum(it),
                   images_per_second=self._window_images * self.env.world_size / max(elapsed, 1e-9),
                   memory_gb=memory_gb(self.device), elapsed_s=now - self._start_time)
        self._window_values.clear()
        self._window_images = 0
        self._last_time = now
        logger.info(format_progress(row, self.total_iterations))
        self.metrics.write(row)

    def _weights_finite(self) -> bool:
        norms = torch._foreach_norm([p.detach() for p in self._trained_params + self._target_params])
        ok = torch.stack([n.float() for n in norms]).isfinite().all().float()
        return bool(dist_utils.all_reduce_mean(ok).item() == 1.0)

    def _save(self, epoch: int, keep: bool) -> None:
        self._drain()  # raises before anything is written when a loss went non-finite
        if not self._weights_finite():
            raise NonFiniteLossError(f"the weights became non-finite at iteration {self.iteration}; no checkpoint was "
                                     f"written: the last good one is "
                                     f"{run_checkpoint.checkpoint_dir(self.run_dir) / 'latest.pt'}")
        rng = self._gather_rng()
        if self.env.is_main:
            state = self.state_dict(epoch, rng)
            folder = run_checkpoint.checkpoint_dir(self.run_dir)
            also = folder / run_checkpoint.periodic_name(self.iteration) if keep else None
            run_checkpoint.atomic_save(state, folder / run_checkpoint.LATEST, also=also)
            logger.info("saved checkpoint at iteration %d%s", self.iteration, f" (kept as {also.name})" if also else "")
        dist_utils.barrier(self.env)

    def _gather_rng(self) -> List[Dict[str, Any]]:
        state = run_checkpoint.rng_state()
        if not dist_utils.is_distributed():
            return [state]
        import torch.distributed as dist
        states: List[Any] = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self, epoch: int, rng: List[Dict[str, Any]]) -> Dict[str, Any]:
        ipe = self.iterations_per_epoch
        return {
            "encoder": self.encoder.state_dict(), "target_encoder": self.target_encoder.state_dict(),
            "predictor": self.predictor.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration, "epoch": self.iteration // ipe,
            "model_name": self.cfg.model.name, "model_kwargs": dict(self.model_kwargs),
            "config": self.cfg.to_dict(),
            "rng": {"world_size": self.env.world_size, "ranks": rng},
            "sampler": {"epoch": self.iteration // ipe, "batches_done": self.iteration % ipe,
                        "iterations_per_epoch": ipe, "batch_size": self.cfg.data.batch_size,
                        "world_size": self.env.world_size, "seed": self.cfg.run.seed},
            "mask_generator": self.mask_state_after_last_batch,
            "loss": self.losses[-1] if self.losses else None,
        }

    def _resume(self) -> None:
        path = run_checkpoint.find_resume_checkpoint(self.run_dir, self.cfg.run.resume)
        if path is None:
            return
        ckpt = run_checkpoint.load_checkpoint(path)
        if ckpt.get("model_name") != self.cfg.model.name:
            raise run_checkpoint.ResumeError(
                f"{path} was trained with model {ckpt.get('model_name')!r}, the config says {self.cfg.model.name!r}; "
                f"use another run.output_dir or run.resume=false to start fresh")
        self.encoder.load_state_dict(ckpt["encoder"])
        self.target_encoder.load_state_dict(ckpt["target_encoder"])
        self.predictor.load_state_dict(ckpt["predictor"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        sampler = ckpt.get("sampler") or {}
        if sampler.get("iterations_per_epoch") not in (None, self.iterations_per_epoch) or \
                sampler.get("world_size") not in (None, self.env.world_size):
            logger.warning("resuming with %d iterations/epoch on %d processes, the checkpoint had %s on %s: the data "
                           "order of the current epoch differs from an uninterrupted run", self.iterations_per_epoch,
                           self.env.world_size, sampler.get("iterations_per_epoch"), sampler.get("world_size"))
        if ckpt.get("mask_generator") is not None:
            self.mask_collator.load_state_dict(ckpt["mask_generator"])
            self.mask_state_after_last_batch = ckpt["mask_generator"]
        ranks = (ckpt.get("rng") or {}).get("ranks") or []
        if self.env.rank < len(ranks):
            run_checkpoint.set_rng_state(ranks[self.env.rank])
        self.resumed_from = str(path)
        logger.info("resumed from %s at iteration %d", path, self.iteration)


def train(config: TrainConfig, dataset: Optional[Dataset] = None,
          env: Optional[dist_utils.DistEnv] = None) -> Dict[str, Any]:
    """Train as configured (resuming when run.resume finds a checkpoint); returns a summary dict."""
    own_env = env is None
    env = env or dist_utils.init_distributed(config.run.device)
    try:
        return Trainer(config, dataset=dataset, env=env).fit()
    finally:
        if own_env:
            dist_utils.cleanup(env)
