"""Multi-block masks of I-JEPA / StoP: one context block and several target blocks per image.

Per batch, one target-block size and one context-block size are drawn from a generator seeded by an
iteration counter: the trainer passes the batch's iteration (data.CollateWithUnreadable), so the masks resume
exactly across epochs and persistent workers; without one, a counter that all DataLoader workers share (a
multiprocessing Value, as the official code keeps it) numbers the batches of one loader pass. Per image, the target blocks go to random places and the context block loses every token
that a target block covers. Every mask of a kind is cut to the batch's shortest so the masks stack.

Differences from the official sampler, on purpose:
- placement is drawn from a generator seeded by (seed, counter), not the worker's global RNG, so the
  masks are a pure function of (seed, counter, batch size) whichever worker builds them;
- it never hangs: sizes that can never satisfy `min_keep` are rejected when the collator is built,
  and the retry loop is bounded by `max_tries` (the official loop can spin forever, I-JEPA issue 68);
- mode="corrected" (default) lets blocks reach the last row and column (see `_placement_range`).
"""
from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import default_collate, get_worker_info

__all__ = ["MaskConfig", "MultiBlockMaskCollator", "MaskSamplingError", "derive_seed"]

logger = logging.getLogger(__name__)

MODES = ("corrected", "official")


class MaskSamplingError(RuntimeError):
    """The grid is too small for the mask constraints (raised instead of retrying forever)."""


@dataclass
class MaskConfig:
    input_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    num_targets: int = 4
    target_scale: Tuple[float, float] = (0.15, 0.2)
    target_aspect: Tuple[float, float] = (0.75, 1.5)
    context_scale: Tuple[float, float] = (0.85, 1.0)
    context_aspect: Tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    mode: str = "corrected"
    # Attempts per context mask before giving up; the official code relaxes its constraint after every
    # `relax_every` failures (it drops one target block from the excluded region each time).
    max_tries: int = 200
    relax_every: int = 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MaskConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("target_scale", "target_aspect", "context_scale", "context_aspect"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ValueError(f"MaskConfig.{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
            setattr(self, name, (float(lo), float(hi)))
        if self.target_scale[1] > 1 or self.context_scale[1] > 1:
            raise ValueError("MaskConfig target_scale and context_scale are fractions of the grid (at most 1)")
        if self.num_targets < 1 or self.patch_size < 1 or self.max_tries < 1 or self.relax_every < 1:
            raise ValueError("MaskConfig: num_targets, patch_size, max_tries and relax_every must be >= 1")
        if self.min_keep < 0:
            raise ValueError(f"MaskConfig.min_keep must be >= 0, got {self.min_keep}")

    @classmethod
    def from_config(cls, section: Any, input_size: Union[int, Tuple[int, int]], patch_size: int) -> "MaskConfig":
        """From the typed `mask` section of the training config (config.MaskConfig, whose defaults are this class's;
        None means this class's default) and the model's input and patch size."""
        values = {f.name: getattr(section, f.name) for f in fields(section) if getattr(section, f.name) is not None}
        return cls(input_size=input_size, patch_size=patch_size, **values)

    @property
    def grid_size(self) -> Tuple[int, int]:
        size = (self.input_size, self.input_size) if isinstance(self.input_size, int) else tuple(self.input_size)
        return size[0] // self.patch_size, size[1] // self.patch_size

    @property
    def min_tokens(self) -> int:
        # The official sampler accepts a mask only with *more* than min_keep tokens; kept in official mode.
        return self.min_keep + 1 if self.mode == "official" else self.min_keep


def block_size(rand: float, scale: Tuple[float, float], aspect: Tuple[float, float],
               grid: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) of a block, as the official sampler computes it from one uniform number.

    One draw sets both the scale and the aspect ratio (they move together), the token budget is
    truncated, and h, w are rounded and then kept strictly below the grid's height and width."""
    height, width = grid
    max_keep = int(height * width * (scale[0] + rand * (scale[1] - scale[0])))
    ratio = aspect[0] + rand * (aspect[1] - aspect[0])
    h = min(int(round(math.sqrt(max_keep * ratio))), height - 1)
    w = min(int(round(math.sqrt(max_keep / ratio))), width - 1)
    return max(h, 0), max(w, 0)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. seed, counter, stream name): independent streams
    for every combination, the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MultiBlockMaskCollator:
    """DataLoader collate_fn returning (collated_batch, context_masks, target_masks).

    context_masks is a list of one (B, Kc) index tensor, target_masks a list of `num_targets` (B, Kt)
    index tensors; indices are row-major patch positions in increasing order."""

    def __init__(self, cfg: MaskConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)
        self.height, self.width = cfg.grid_size
        # Shared with forked/spawned DataLoader workers (the official code shares its counter the same way).
        # _counter: first unused counter value; _loader_key/_loader_base: which DataLoader iteration the
        # workers belong to and the counter of its first batch (guarded by _counter's lock).
        # A spawn-context lock can be handed to fork, spawn and forkserver workers alike (a fork-context one
        # cannot go to spawn workers).
        shared = multiprocessing.get_context("spawn")
        self._counter = shared.Value("q", 0)
        self._loader_key = shared.RawValue("q", -1)
        self._loader_base = shared.RawValue("q", 0)
        self._worker_calls: Tuple[int, int] = (-1, 0)  # per process: (loader key, batches built)
        self._after_last: Union[int, None] = None  # per process: counter after the last batch built here
        self._check_feasible()
        rows = torch.arange(self.height).repeat_interleave(self.width)
        cols = torch.arange(self.width).repeat(self.height)
        self._rows, self._cols = rows, cols
        self.last_relaxed = 0  # context masks of the last batch that needed a relaxed constraint

    # ---------------------------------------------------------------- validation
    def _describe(self) -> str:
        c = self.cfg
        return (f"grid {self.height}x{self.width} (input_size={c.input_size}, patch_size={c.patch_size}), "
                f"target_scale={c.target_scale}, target_aspect={c.target_aspect}, context_scale={c.context_scale}, "
                f"min_keep={c.min_keep} (mode={c.mode!r}: a mask needs at least {c.min_tokens} tokens)")

    def _check_feasible(self) -> None:
        """Reject configurations the official sampler would loop on forever (sizes are piecewise constant
        in the uniform draw, so a fine scan finds the smallest block)."""
        if self.height < 2 or self.width < 2:
            raise MaskSamplingError(f"Mask grid too small: {self._describe()}. Use a larger input or smaller patch.")
        c, grid = self.cfg, (self.height, self.width)
        draws = [i / 4096 for i in range(4097)]
        smallest_target = min(h * w for h, w in (block_size(r, c.target_scale, c.target_aspect, grid) for r in draws))
        smallest_context = min(h * w for h, w in (block_size(r, c.context_scale, c.context_aspect, grid) for r in draws))
        for what, n in (("target", smallest_target), ("context", smallest_context)):
            if n < c.min_tokens:
                largest_ok = n - (c.min_tokens - c.min_keep)
                raise MaskSamplingError(
                    f"Cannot sample multi-block masks: {what} blocks can have only {n} tokens on the {self._describe()}. "
                    f"Set min_keep to at most {largest_ok}, or enlarge the {what} scale or the grid.")

    # ---------------------------------------------------------------- counter
    def _next_counter(self) -> int:
        """Counter of the next batch.

        In the main process: consecutive values. In a DataLoader worker: batch i of the loader iteration gets
        base + i whichever worker is faster (map-style loaders hand batch i to worker i % num_workers, and
        a worker's k-th batch is batch k * num_workers + id), so masks and resume do not depend on timing."""
        info = get_worker_info()
        if info is None:
            with self._counter.get_lock():
                value = self._counter.value
                self._counter.value = value + 1
        else:
            key = (info.seed - info.id) & ((1 << 63) - 1)  # the iteration's base seed, equal in all its workers
            with self._counter.get_lock():
                if self._loader_key.value != key:  # first batch of a new loader iteration, from any worker
                    self._loader_key.value = key
                    self._loader_base.value = self._counter.value
                base = self._loader_base.value
                calls = self._worker_calls[1] if self._worker_calls[0] == key else 0
                value = base + calls * info.num_workers + info.id
                self._worker_calls = (key, calls + 1)
                self._counter.value = max(self._counter.value, value + 1)
        self._after_last = value + 1
        return value

    def state_dict(self) -> Dict[str, Any]:
        """State right after the last batch this process built (in a DataLoader worker: that worker's batch,
        so a collate_fn can hand it to the trainer with the batch); before any, the shared counter."""
        counter = self._after_last if self._after_last is not None else int(self._counter.value)
        return {"counter": counter, "seed": self.seed, "config": asdict(self.cfg)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "counter" not in state:
            raise KeyError(f"mask generator state needs a 'counter' entry, got keys {sorted(state)}")
        self.seed = int(state.get("seed", self.seed))
        with self._counter.get_lock():
            self._counter.value = int(state["counter"])
            self._loader_key.value = -1
        self._worker_calls, self._after_last = (-1, 0), None

    # ---------------------------------------------------------------- sampling
    def _placement_range(self, size: int, extent: int) -> int:
        # Official quirk (I-JEPA issues 40, 59): randint(0, extent - size) never places a block on the last row/column.
        return extent - size if self.cfg.mode == "official" else extent - size + 1

    def _block_indices(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        offsets = (torch.arange(h)[:, None] * self.width + torch.arange(w)[None, :]).reshape(-1)
        return (top * self.width + left).unsqueeze(-1) + offsets  # increasing, as the grid is row-major

    def sample(self, batch_size: int, counter: Optional[int] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The masks of one batch. `counter` None: the next value of the shared counter; else the given one
        (the trainer passes the batch's iteration, so the masks do not depend on which worker builds them)."""
        if counter is None:
            return self._sample(batch_size, self._next_counter())
        self._after_last = int(counter) + 1
        return self._sample(batch_size, int(counter))

    def _sample(self, batch_size: int, counter: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        c, B, T, N = self.cfg, batch_size, self.cfg.num_targets, self.height * self.width
        grid = (self.height, self.width)
        sizes = torch.Generator().manual_seed(counter + (self.seed << 32))  # seed 0: the official size sequence
        th, tw = block_size(torch.rand(1, generator=sizes).item(), c.target_scale, c.target_aspect, grid)
        ch, cw = block_size(torch.rand(1, generator=sizes).item(), c.context_scale, c.context_aspect, grid)
        g = torch.Generator().manual_seed(derive_seed(self.seed, counter, "positions"))

        top = torch.randint(0, self._placement_range(th, self.height), (B, T), generator=g)
        left = torch.randint(0, self._placement_range(tw, self.width), (B, T), generator=g)
        targets = self._block_indices(top, left, th, tw)  # (B, T, th*tw)

        covered = torch.zeros(B, T, N, dtype=torch.bool).scatter_(2, targets, True)  # (B, T, N)
        excluded = covered.any(dim=1)  # (B, N): all target blocks

        context = torch.zeros(B, N, dtype=torch.bool)
        failures = torch.zeros(B, dtype=torch.long)
        pending = torch.arange(B)
        while pending.numel():
            p = pending.numel()
            ctop = torch.randint(0, self._placement_range(ch, self.height), (p, 1), generator=g)
            cleft = torch.randint(0, self._placement_range(cw, self.width), (p, 1), generator=g)
            block = ((self._rows >= ctop) & (self._rows < ctop + ch) & (self._cols >= cleft) & (self._cols < cleft + cw))
            if c.allow_overlap:
                kept = block
            else:
                kept = block & ~excluded[pending]
                relaxed = failures[pending] >= c.relax_every
                if bool(relaxed.any()):
                    # Relax as the official code does: after every `relax_every` failures, the last excluded
                    # target block is allowed back into the context.
                    n_excluded = (T - failures[pending] // c.relax_every).clamp(min=0)
                    first_n = torch.arange(T) < n_excluded[:, None]  # (p, T)
                    kept = block & ~(covered[pending] & first_n[..., None]).any(dim=1)
            ok = kept.sum(1) >= c.min_tokens
            context[pending[ok]] = kept[ok]
            failures[pending[~ok]] += 1
            pending = pending[~ok]
            if pending.numel() and int(failures.max()) >= c.max_tries:
                raise MaskSamplingError(
                    f"No context mask with enough tokens after {c.max_tries} tries on the {self._describe()}, "
                    f"context block {ch}x{cw}, {T} target blocks {th}x{tw}. Lower min_keep or num_targets, "
                    f"set allow_overlap=True, or raise max_tries.")
        self.last_relaxed = int((failures >= c.relax_every).sum())
        if self.last_relaxed:
            logger.warning("mask collator: %d context masks needed a relaxed target exclusion", self.last_relaxed)

        keep = int(context.sum(1).min())
        # Kept tokens first, in increasing index order (stable sort), then cut to the batch's shortest.
        context_idx = torch.argsort((~context).to(torch.uint8), dim=1, stable=True)[:, :keep]
        target_masks = [targets[:, t].contiguous() for t in range(T)]  # all th*tw long: no cut needed
        return [context_idx.contiguous()], target_masks

    def __call__(self, batch: Sequence[Any], counter: Optional[int] = None):
        context_masks, target_masks = self.sample(len(batch), counter)
        return default_collate(batch), context_masks, target_masks

    def __repr__(self) -> str:
        fields_text = ", ".join(f"{f.name}={getattr(self.cfg, f.name)!r}" for f in fields(self.cfg))
        return f"MultiBlockMaskCollator({fields_text}, seed={self.seed})"
