"""The training loop around model.StoPModel: data, schedules, logging, checkpoints.

The method itself (targets, context, predictor, loss, EMA, parameter groups) is model.StoPModel. The loss stays on
the device: the host waits for it only every `run.log_every` iterations and at checkpoints, where a non-finite loss
stops the run. Resume is exact, DataLoader workers included: the sampler's keys carry the epoch, and every sample's
augmentations and every batch's masks are seeded from where they are in the run (data.pretraining_loader).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from flexpredict_zoo.atomic_write import remove_stale_temporaries
from flexpredict_zoo.locks import output_lock

from . import distributed as dist_utils
from . import run_checkpoint
from .config import ConfigError, TrainConfig
from .data import build_pretraining_dataset, pretraining_loader
from .gpu_data import GpuAugment, check_decode_device, collate_jpeg_bytes, decode_and_augment, prefetch
from .logs import MetricsLog, format_progress, logger, memory_gb, setup_logging
from .masks import MaskConfig, MultiBlockMaskCollator, derive_seed
from .model import StoPModel, encoder_kwargs
from .optim import build_optimizer, set_hyperparameters
from .schedules import Schedule


RUN_LOCK = ".lock"  # RUN_DIR/.lock: held by the process training into RUN_DIR


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint was left as it was."""


class UnreadableDataError(RuntimeError):
    """Too many images could not be read."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("run.precision=fp16 needs a CUDA GPU (gradient scaling); on CPU use fp32 or bf16")
        return "fp32" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- trainer

class Trainer:
    """Trains a model.StoPModel as configured: `fit()` runs the loop from where the run directory's checkpoint left
    off. `model` is the StoPModel; `train_step` is one update; `batches(epoch, start_batch)` the data on the device."""

    def __init__(self, cfg: TrainConfig, dataset: Optional[Dataset] = None,
                 env: Optional[dist_utils.DistEnv] = None):
        self.cfg = cfg
        self.env = env or dist_utils.init_distributed(cfg.run.device)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.output_dir).expanduser()
        self._held = contextlib.ExitStack()  # the run folder's lock, until fit() ends or close()
        self._locked = False  # whether this process took that lock (only then may a failed start remove the folder)
        self._start_time: Optional[float] = None  # set by fit()
        self.losses: List[float] = []
        created = self.env.is_main and not self.run_dir.exists()
        try:
            self._start(dataset, created)
        except BaseException:
            self._abandon(created)
            raise

    def _start(self, dataset: Optional[Dataset], created: bool) -> None:
        cfg = self.cfg
        removed: List[Path] = []
        if self.env.is_main:
            # one process per run folder: a second training here is refused, naming the first, instead of
            # resuming from its checkpoint in flight and interleaving its log.csv rows
            self._held.enter_context(output_lock(self.run_dir / RUN_LOCK, self.run_dir, "training run"))
            self._locked = True
            folder = run_checkpoint.checkpoint_dir(self.run_dir)
            folder.mkdir(parents=True, exist_ok=True)
            # what a killed save left (we hold the lock, so no living process is writing them)
            removed = remove_stale_temporaries(folder, [run_checkpoint.LATEST, "iter_*.pt"]) + \
                remove_stale_temporaries(self.run_dir, ["config.yaml", "log.csv"])
        dist_utils.barrier(self.env)
        setup_logging(self.run_dir if self.env.is_main else None, self.env.is_main, self.env.rank)
        if removed:
            logger.info("removed %d temporary file(s) left by a stopped run: %s", len(removed),
                        ", ".join(str(p) for p in removed))
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        check_decode_device(cfg.data.decode, self.device)  # data.decode=gpu needs CUDA: say so before building

        # identical initial weights on every rank; per-rank randomness (noise, masks) after
        _seed_everything(cfg.run.seed)
        self.model = StoPModel.from_config(cfg.model, cfg.predictor).to(self.device)
        self.init_info = self.model.load_official(cfg.run.init_from) if cfg.run.init_from else None
        _seed_everything(cfg.run.seed + self.env.rank)
        self.optimizer = build_optimizer(self.model.param_groups(), cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.ddp_model = dist_utils.wrap_ddp(self.model, self.env)  # the model itself on one process
        self.compile_counter = None
        if cfg.run.compile:
            from .compile import CompileCounter, compile_model  # token dims dynamic: one graph per network
            self.compile_counter = compile_model(self.model, CompileCounter(mode=cfg.run.compile_mode))

        # data.decode=gpu: the dataset yields file bytes; the device decodes and augments them in batches()
        self.gpu_augment = GpuAugment.from_data_config(cfg.data, cfg.model.img_size) \
            if cfg.data.decode == "gpu" else None
        self.dataset = dataset if dataset is not None else build_pretraining_dataset(cfg.data, cfg.model.img_size)
        encoder = self.model.context_encoder
        mask_cfg = MaskConfig.from_config(cfg.mask, tuple(encoder.patch_embed.img_size),
                                          encoder.patch_embed.patch_size[0])
        # seed + rank: equal seeds would give every rank the same masks at an iteration
        self.mask_collator = MultiBlockMaskCollator(mask_cfg, seed=cfg.run.seed + self.env.rank)
        self.sampler = dist_utils.ResumableDistributedSampler(
            self.dataset, num_replicas=self.env.world_size, rank=self.env.rank, seed=cfg.run.seed, shuffle=True,
            drop_last=cfg.data.drop_last)
        self.iterations_per_epoch = self._iterations_per_epoch()
        self.schedule = Schedule.from_config(cfg.optim, self.iterations_per_epoch)
        self.total_iterations = cfg.optim.epochs * self.iterations_per_epoch
        if cfg.run.max_steps is not None:
            self.total_iterations = min(self.total_iterations, cfg.run.max_steps)

        self._data_loader: Optional[DataLoader] = None
        self.iteration = 0
        self.unreadable: Dict[str, str] = {}
        self.resumed_from = None
        self.elapsed_before = 0.0  # training time of the earlier parts of a resumed run (log.csv's elapsed_s)
        self._resume()
        if self.env.is_main:
            cfg.save(self.run_dir / "config.yaml")

    def _abandon(self, created: bool) -> None:
        """A run that failed to start: release the folder, and remove it if this process created it and nothing
        was trained into it (a mistyped data.root must not leave empty run folders behind)."""
        setup_logging(None, self.env.is_main, self.env.rank)  # closes train.log
        trained = any(run_checkpoint.checkpoint_dir(self.run_dir).glob("*.pt"))
        if created and self._locked and self.run_dir.is_dir() and not trained:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the run folder (fit() does this when it ends)."""
        self._held.close()

    def _iterations_per_epoch(self) -> int:
        d = self.cfg.data
        batches = self.sampler.num_samples // d.batch_size if d.drop_last else \
            math.ceil(self.sampler.num_samples / d.batch_size)
        if batches < 1:
            raise ConfigError(f"the dataset has {len(self.dataset)} images, {self.sampler.num_samples} per process: "
                              f"fewer than data.batch_size={d.batch_size}; lower the batch size")
        ipe = self.cfg.optim.iterations_per_epoch or batches
        if ipe > batches:
            raise ConfigError(f"optim.iterations_per_epoch={ipe} is more than the {batches} batches per epoch of "
                              f"this dataset and world size; lower it or leave it null")
        return ipe

    # ------------------------------------------------------------------------------------------- data
    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, List[torch.Tensor],
                                                                         List[torch.Tensor]]]:
        """(images, context_masks, target_masks) on the device for the batches of `epoch` from `start_batch` on,
        in the order of an uninterrupted run. Unreadable images are logged and counted (UnreadableDataError past
        data.max_unreadable_fraction).

        data.decode=gpu: the same loader with workers that read file bytes; the device decodes them (files that do
        not decode are counted as unreadable, as the CPU path counts them) and augments the batch with draws seeded
        from (run.seed, rank, iteration), so the augmentations too resume exactly."""
        d = self.cfg.data
        gpu = self.gpu_augment is not None
        self.sampler.set_epoch(epoch)  # in the main process, before the pass: the keys carry the epoch
        self.sampler.set_start_index(start_batch * d.batch_size)
        if self._data_loader is None:  # one loader for the whole run: persistent workers
            self._data_loader = pretraining_loader(
                self.dataset, self.sampler, self.mask_collator, batch_size=d.batch_size,
                iterations_per_epoch=self.iterations_per_epoch, num_workers=d.num_workers, seed=self.cfg.run.seed,
                drop_last=d.drop_last, pin_memory=d.pin_memory and self.device.type == "cuda" and not gpu,
                # a generator of its own for worker seeds: building a loader never draws from the global RNG
                generator=torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.env.rank),
                collate=collate_jpeg_bytes if gpu else default_collate)
        non_blocking = self.device.type == "cuda"
        items = iter(self._data_loader)  # here, in the main process: the sampler's epoch and start are set
        if gpu:  # decoded up to data.prefetch batches ahead, overlapping the step
            items = prefetch(items, self._decode_on_device, self.device, depth=d.prefetch)
        for collated, context_masks, target_masks, bad, iteration in items:
            self._count_unreadable(bad, collated)
            images = collated[0] if isinstance(collated, (list, tuple)) else collated
            yield (images.to(self.device, non_blocking=non_blocking),
                   [m.to(self.device, non_blocking=non_blocking) for m in context_masks],
                   [m.to(self.device, non_blocking=non_blocking) for m in target_masks])

    def _decode_on_device(self, item):
        """data.decode=gpu: a loader item of file bytes -> the same item with decoded, augmented images (draws
        seeded by the batch's iteration) and the files that did not decode added to its unreadable list."""
        collated, context_masks, target_masks, bad, iteration = item
        if collated is None:
            return item
        data, _, paths = collated
        images, context_masks, target_masks, _, undecodable = decode_and_augment(
            data, paths, context_masks, target_masks, self.gpu_augment, self.device,
            seed=derive_seed(self.cfg.run.seed, self.env.rank, iteration, "gpu-augment"))
        return images, context_masks, target_masks, bad + [(str(u.path), str(u.error)) for u in undecodable], iteration

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

    # ------------------------------------------------------------------------------------------- step
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images: torch.Tensor, context_masks: Sequence[torch.Tensor],
                   target_masks: Sequence[torch.Tensor], iteration: int) -> torch.Tensor:
        """One update with the hyperparameters of `iteration`; returns the loss as a detached device tensor."""
        if self.compile_counter is not None and self.compile_counter.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous step's graph outputs are done with
        set_hyperparameters(self.optimizer, self.schedule.lr(iteration), self.schedule.weight_decay(iteration))
        with self.autocast():
            loss = self.ddp_model(images, context_masks, target_masks)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.trained_parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(self.schedule.momentum(iteration))
        return loss.detach()

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        ipe, total = self.iterations_per_epoch, self.total_iterations
        # rows past the checkpoint this run resumed from are dropped: they are trained again now
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main, start_iteration=self.iteration)
        if not self.elapsed_before and self.iteration:  # a checkpoint older than elapsed_s: the log's last row
            self.elapsed_before = self.metrics.last_elapsed_s
        self.losses: List[float] = []
        self._window: List[torch.Tensor] = []
        self._window_values: List[float] = []
        self._window_images = 0
        self._last_time = self._start_time = time.perf_counter()
        start_iteration = self.iteration
        logger.info("training %s on %s (%s, %d process%s), %d iterations/epoch, iterations %d..%d, run dir %s",
                    cfg.model.name, self.device, self.precision, self.env.world_size,
                    "es" if self.env.world_size > 1 else "", ipe, self.iteration, total, self.run_dir)
        try:
            while self.iteration < total:
                epoch = self.iteration // ipe
                for images, context_masks, target_masks in self.batches(epoch, self.iteration - epoch * ipe):
                    self._window.append(self.train_step(images, context_masks, target_masks, self.iteration))
                    self._window_images += images.shape[0]
                    self.iteration += 1
                    if self.iteration % cfg.run.log_every == 0 or self.iteration == total:
                        self._log(epoch)
                    keep = cfg.run.keep_every is not None and self.iteration % cfg.run.keep_every == 0
                    if self.iteration % cfg.run.checkpoint_every == 0 or keep or self.iteration == total:
                        self._save(keep=keep or self.iteration == total)
                    if self.iteration % ipe == 0 or self.iteration >= total:
                        break
        finally:
            try:
                self.metrics.close()
            finally:
                self.close()
        dist_utils.barrier(self.env)
        from .plot import plot_command  # matplotlib is imported only when a plot is drawn
        logger.info("plot this run: %s", plot_command(self.run_dir))
        wall = time.perf_counter() - self._start_time
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

    def _drain(self) -> None:
        """The host sync: move the pending losses to the host (averaged over ranks) and stop on a non-finite one."""
        if not self._window:
            return
        values = dist_utils.all_reduce_mean(torch.stack(self._window).float()).tolist()
        first = self.iteration - len(values) + 1
        self._window.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at iteration {first + offset} (after iteration {first + offset - 1}); training "
                    f"stopped and no checkpoint was written after it: {self._last_good_checkpoint()}. Lower "
                    f"optim.lr_peak, set optim.clip_grad, or use run.precision=fp32/bf16, then resume")
        self.losses.extend(values)
        self._window_values.extend(values)

    def _elapsed(self, now: Optional[float] = None) -> float:
        """Training time of the whole run, across resumes."""
        start = self._start_time
        return self.elapsed_before + ((now or time.perf_counter()) - start if start is not None else 0.0)

    def _log(self, epoch: int) -> None:
        self._drain()
        now = time.perf_counter()
        elapsed = now - self._last_time
        it = self.iteration - 1  # the iteration whose hyperparameters were just used
        row = dict(iteration=self.iteration, epoch=epoch, loss=float(np.mean(self._window_values)),
                   loss_last=self._window_values[-1], lr=self.schedule.lr(it), weight_decay=self.schedule.weight_decay(it),
                   momentum=self.schedule.momentum(it),
                   images_per_second=self._window_images * self.env.world_size / max(elapsed, 1e-9),
                   memory_gb=memory_gb(self.device), elapsed_s=self._elapsed(now))
        self._window_values.clear()
        self._window_images = 0
        self._last_time = now
        logger.info(format_progress(row, self.total_iterations))
        self.metrics.write(row)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _weights_finite(self) -> bool:
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        ok = torch.stack([n.float() for n in norms]).isfinite().all().float()
        return bool(dist_utils.all_reduce_mean(ok).item() == 1.0)

    def _last_good_checkpoint(self) -> str:
        latest = run_checkpoint.checkpoint_dir(self.run_dir) / run_checkpoint.LATEST
        if latest.is_file():
            return f"the last good one is {latest}"
        return "none was written before it (the run starts again from scratch)"

    def _save(self, keep: bool) -> None:
        self._drain()  # raises before anything is written when a loss went non-finite
        if not self._weights_finite():
            raise NonFiniteLossError(f"the weights became non-finite at iteration {self.iteration}; no checkpoint was "
                                     f"written: {self._last_good_checkpoint()}")
        rng = run_checkpoint.rng_states_of_all_ranks()
        if self.env.is_main:
            folder = run_checkpoint.checkpoint_dir(self.run_dir)
            also = folder / run_checkpoint.periodic_name(self.iteration) if keep else None
            run_checkpoint.atomic_save(self.state_dict(rng), folder / run_checkpoint.LATEST, also=also)
            logger.info("saved checkpoint at iteration %d%s", self.iteration, f" (kept as {also.name})" if also else "")
        dist_utils.barrier(self.env)

    def state_dict(self, rng: List[Dict[str, Any]]) -> Dict[str, Any]:
        ipe = self.iterations_per_epoch
        return {
            **self.model.networks_state_dict(),  # encoder, target_encoder, predictor (the official names)
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration, "epoch": self.iteration // ipe,
            "model_name": self.cfg.model.name, "model_kwargs": encoder_kwargs(self.cfg.model),
            "config": self.cfg.to_dict(),
            "rng": {"world_size": self.env.world_size, "ranks": rng},
            "sampler": {"epoch": self.iteration // ipe, "batches_done": self.iteration % ipe,
                        "iterations_per_epoch": ipe, "batch_size": self.cfg.data.batch_size,
                        "world_size": self.env.world_size, "seed": self.cfg.run.seed},
            # the masks of iteration i are drawn from (seed, i): the counter is the iteration
            "mask_generator": dict(self.mask_collator.state_dict(), counter=self.iteration),
            "loss": self.losses[-1] if self.losses else None,
            "elapsed_s": self._elapsed(),
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
        self.model.load_networks_state_dict(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.elapsed_before = float(ckpt.get("elapsed_s") or 0.0)
        sampler = ckpt.get("sampler") or {}
        if sampler.get("iterations_per_epoch") not in (None, self.iterations_per_epoch) or \
                sampler.get("world_size") not in (None, self.env.world_size):
            logger.warning("resuming with %d iterations/epoch on %d processes, the checkpoint had %s on %s: the data "
                           "order of the current epoch differs from an uninterrupted run", self.iterations_per_epoch,
                           self.env.world_size, sampler.get("iterations_per_epoch"), sampler.get("world_size"))
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
