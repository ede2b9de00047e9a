"""The linear probe at any scale: a sweep of linear classifiers trained at once, in torch, on streamed features.

As DINOv2's linear evaluation: many linear heads in one module, each with its own learning rate and weight decay,
all fed by one forward of the shared features per batch, so a sweep of H settings costs one pass over the
features per epoch, not H. The features are never held whole: the probe reads them in batches from a
`FeatureBatches` source (an in-memory or memory-mapped matrix through `TensorBatches`, or a feature store with
`__len__` and `iter_batches(batch_size, shuffle, seed)`), so they may be larger than memory.

    result = fit_linear_probe(TensorBatches(train_x, train_y), TensorBatches(test_x, test_y))
    result.top1, result.lr, result.weight_decay, result.val_top1

Protocol (the choices, and why):
- Features are standardised with the mean and standard deviation of the training rows (one streaming pass), as
  the scikit-learn probe does, so one learning-rate grid suits any model, layer or concatenation of layers.
- SGD with momentum 0.9, batch 1024, cosine learning rate to 0, zero-initialised heads (deterministic).
  Training runs `epochs` passes, more when the data set is small: at least `min_steps` optimiser steps.
- Hyperparameters are chosen on a held-out part of the TRAINING set (`val_fraction`, seeded), never on the test
  set, by the held-out mean cross-entropy (a proper score: on a few hundred held-out rows, accuracy moves in
  steps of 1/n and picks by noise; on digits it chose settings 1 to 2 points worse on the test set), or by
  held-out top-1 (`select="accuracy"`, DINOv2's rule). A row is held out by a seeded hash of its feature
  bytes: the split needs no row index, so it is the same whatever order or batching a source streams in, and
  identical images fall on the same side. The chosen
  setting is then retrained on the whole training set (`refit=True`, the default, as the paper's probes are
  trained on all of ImageNet's training images); `refit=False` keeps the head of the sweep.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)
EPOCHS = 10
MIN_STEPS = 2000
BATCH_SIZE = 1024
MOMENTUM = 0.9
VAL_FRACTION = 0.1
_HASH_PRIME = 2_147_483_647  # 2^31 - 1: every product in the row hash stays far below 2^63 (no overflow)


# ----------------------------------------------------------------------------------------------- sources
@runtime_checkable
class FeatureBatches(Protocol):
    """Rows of features with their labels, read a batch at a time."""

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...


def as_tensor(x) -> torch.Tensor:
    """A tensor, numpy array or (read-only) memory-map slice as a torch tensor, without a copy where one is not needed."""
    if isinstance(x, torch.Tensor):
        return x
    array = np.asarray(x)
    # a slice of a read-only memory map: copy the batch (torch tensors must be writable)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class TensorBatches:
    """A feature matrix and its labels (torch tensors, numpy arrays or numpy memory maps) as `FeatureBatches`.
    In order, a batch is a view of the rows; shuffled, a gather of `batch_size` rows in sorted order (a memory
    map then reads near-sequentially). Nothing is copied whole."""

    def __init__(self, features, labels):
        if len(features) != len(labels):
            raise ValueError(f"features have {len(features)} rows but labels {len(labels)}")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def iter_batches(self, batch_size: int, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        numpy_rows = not isinstance(self.features, torch.Tensor)
        for start in range(0, n, batch_size):
            if order is None:
                rows = slice(start, start + batch_size)
            else:
                rows = order[start:start + batch_size].sort().values
                rows = rows.numpy() if numpy_rows else rows
            yield as_tensor(self.features[rows]), as_tensor(self.labels[rows])


def as_batches(features, labels=None) -> FeatureBatches:
    """`features` itself when it is a `FeatureBatches` source, else `TensorBatches(features, labels)`."""
    if isinstance(features, FeatureBatches):
        return features
    if labels is None:
        raise ValueError("labels are needed with an in-memory feature matrix")
    return TensorBatches(features, labels)


@functools.lru_cache(maxsize=8)
def _hash_parameters(width: int, seed: int, device: torch.device) -> Tuple[torch.Tensor, int, int]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randint(1, 1 << 30, (width,), generator=g).to(device)
    a, b = (int(v) for v in torch.randint(1, _HASH_PRIME, (2,), generator=g))
    return weights, a, b


def held_out_rows(features: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """(B,) bool: the rows of a batch that belong to the held-out part, `fraction` of them in expectation.
    A seeded hash of each row's bytes, exact integer arithmetic: the same row gives the same answer in any
    batch, on any device, in any order."""
    halves = features.contiguous().view(torch.int16).long() & 0xFFFF  # (B, D * bytes / 2), each < 2^16
    if halves.shape[1] >= 1 << 15:
        raise ValueError(f"rows of {features.shape[1]} features are too wide for the held-out hash")
    weights, a, b = _hash_parameters(halves.shape[1], seed, halves.device)
    h = (halves * weights).sum(1) % _HASH_PRIME  # each sum < 2^15 * 2^16 * 2^30 = 2^61
    h = (h * a + b) % _HASH_PRIME
    return h < int(fraction * _HASH_PRIME)


# ----------------------------------------------------------------------------------------------- heads
class LinearHeads(nn.Module):
    """H linear classifiers over the same features, one forward: (B, D) -> (B, H, C). Head h is trained with
    learning rate `lrs[h]` and weight decay `weight_decays[h]` (on the weight, not the bias) by `train_step`."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], weight_decays: Sequence[float]):
        super().__init__()
        if len(lrs) != len(weight_decays) or not lrs:
            raise ValueError("one learning rate and one weight decay per head, at least one head")
        self.num_heads, self.num_classes = len(lrs), num_classes
        self.weight = nn.Parameter(torch.zeros(self.num_heads * num_classes, dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.num_heads * num_classes), requires_grad=False)
        self.register_buffer("lrs", torch.tensor(lrs, dtype=torch.float32).repeat_interleave(num_classes)[:, None])
        self.register_buffer("weight_decays",
                             torch.tensor(weight_decays, dtype=torch.float32).repeat_interleave(num_classes)[:, None])
        self.register_buffer("weight_momentum", torch.zeros_like(self.weight))
        self.register_buffer("bias_momentum", torch.zeros_like(self.bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias).view(len(features), self.num_heads, self.num_classes)

    @torch.no_grad()
    def train_step(self, features: torch.Tensor, labels: torch.Tensor, lr_scale: float,
                   momentum: float = MOMENTUM) -> None:
        """One SGD step (momentum, PyTorch's form) of every head on its own mean cross-entropy, each at
        lr_scale x its own learning rate. The gradient of softmax regression is written out, (softmax - one-hot)
        / B, so a step is two matrix products and no autograd graph."""
        logits = self(features)
        # softmax written out: torch's own is several times slower on CPU for a short last axis (10 classes)
        probs = (logits - logits.amax(2, keepdim=True)).exp_()
        probs /= probs.sum(2, keepdim=True)
        probs[torch.arange(len(labels), device=labels.device), :, labels] -= 1
        grad_logits = probs.view(len(labels), -1) / len(labels)  # (B, H C)
        weight_grad = grad_logits.T @ features + self.weight_decays * self.weight
        for param, grad, buffer, lrs in ((self.weight, weight_grad, self.weight_momentum, self.lrs),
                                         (self.bias, grad_logits.sum(0), self.bias_momentum, self.lrs[:, 0])):
            buffer.mul_(momentum).add_(grad)
            param.sub_(lr_scale * lrs * buffer)


# ----------------------------------------------------------------------------------------------- passes
@dataclass
class _Statistics:
    """Count, mean and sum of squared deviations per feature, in float64, merged batch by batch (Chan et al.'s
    parallel update: stable whatever the features' offset, and no float64 copy of more than one batch)."""
    count: int = 0
    mean: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        if len(x):
            x = x.double()
            batch_mean = x.mean(0)
            self.merge(_Statistics(len(x), batch_mean, ((x - batch_mean) ** 2).sum(0)))

    def merge(self, other: "_Statistics") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / total)
        self.count = total

    def merged(self, other: "_Statistics") -> "_Statistics":
        both = _Statistics()
        both.merge(self)
        both.merge(other)
        return both

    def mean_and_inverse_std(self) -> Tuple[torch.Tensor, torch.Tensor]:
        std = (self.m2 / self.count).sqrt()
        # constant features carry nothing: scale them by 1 (scikit-learn's StandardScaler does the same)
        return self.mean.float(), torch.where(std > 0, 1 / std, torch.ones_like(std)).float()


def _scan(source: FeatureBatches, batch_size: int, fraction: float, seed: int, device: torch.device):
    """One pass: feature statistics of the fitting and held-out parts, and the number of classes."""
    fit, held = _Statistics(), _Statistics()
    max_label = -1
    for x, y in source.iter_batches(batch_size, shuffle=False, seed=seed):
        x, y = x.to(device), y.to(device)
        mask = held_out_rows(x, fraction, seed)
        x = x.float()
        fit.add(x[~mask])
        held.add(x[mask])
        max_label = max(max_label, int(y.max())) if len(y) else max_label
        if len(y) and int(y.min()) < 0:
            raise ValueError("the training features have a negative label: the linear probe needs labels 0..C-1")
    if fit.count == 0:
        raise ValueError("no training features: the linear probe needs at least one labelled row")
    return fit, held, max_label + 1


def _train_heads(source: FeatureBatches, heads: LinearHeads, mean: torch.Tensor, inv_std: torch.Tensor, *,
                 epochs: int, batch_size: int, seed: int, device: torch.device,
                 keep: Optional[Tuple[float, int, bool]] = None) -> int:
    """Trains `heads` on the standardised rows of `source` (all of them, or, with keep = (fraction, seed,
    held_out), those on one side of the split); the learning rate follows a cosine from 1 to 0. Returns steps."""
    steps_per_epoch = math.ceil(len(source) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        for x, y in source.iter_batches(batch_size, shuffle=True, seed=seed + epoch):
            x, y = x.to(device), y.to(device)
            if keep is not None:
                mask = held_out_rows(x, keep[0], keep[1]) == keep[2]
                x, y = x[mask], y[mask]
            if len(y):
                heads.train_step((x.float() - mean) * inv_std, y, 0.5 * (1 + math.cos(math.pi * step / total)))
            step += 1
    return step


@torch.no_grad()
def _score_heads(source: FeatureBatches, heads: LinearHeads, mean: torch.Tensor, inv_std: torch.Tensor, *,
                 batch_size: int, device: torch.device,
                 keep: Optional[Tuple[float, int, bool]] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(correct predictions per head, summed cross-entropy per head, rows) over the rows of `source`."""
    correct = torch.zeros(heads.num_heads, dtype=torch.long, device=device)
    loss = torch.zeros(heads.num_heads, dtype=torch.float64, device=device)
    count = 0
    for x, y in source.iter_batches(batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        if keep is not None:
            mask = held_out_rows(x, keep[0], keep[1]) == keep[2]
            x, y = x[mask], y[mask]
        logits = heads((x.float() - mean) * inv_std)
        correct += (logits.argmax(2) == y[:, None]).sum(0)
        # labels the heads have no class for (seen only in the test set) count as wrong, with no loss term
        known = y < heads.num_classes
        log_probs = logits[known].log_softmax(2)
        loss -= log_probs.gather(2, y[known, None, None].expand(-1, heads.num_heads, 1))[..., 0].sum(0).double()
        count += len(y)
    return correct.cpu(), loss.cpu(), count


# ----------------------------------------------------------------------------------------------- the probe
@dataclass
class LinearProbeResult:
    """top1: test top-1 in percent of the chosen setting; val_top1: its top-1 on the held-out part of the
    training set; sweep: every setting with its held-out top-1 and mean cross-entropy; sweep_seconds: training
    and scoring the sweep (with the CUDA queue drained), refit_seconds: the refit."""
    top1: float
    val_top1: float
    lr: float
    weight_decay: float
    epochs: int
    steps: int
    dim: int
    batch_size: int
    train_rows: int
    val_rows: int
    test_rows: int
    refit: bool
    select: str
    device: str
    sweep_seconds: float
    refit_seconds: float
    sweep: List[Dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def fit_linear_probe(train: FeatureBatches, test: FeatureBatches, *,
                     lrs: Sequence[float] = LEARNING_RATES, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                     epochs: int = EPOCHS, min_steps: int = MIN_STEPS, batch_size: int = BATCH_SIZE,
                     val_fraction: float = VAL_FRACTION, refit: bool = True, select: str = "loss", seed: int = 0,
                     device: Union[str, torch.device, None] = None) -> LinearProbeResult:
    """Sweeps lrs x weight_decays on (1 - val_fraction) of `train`, picks the setting of lowest mean
    cross-entropy on the held-out `val_fraction` (`select="accuracy"`: of best held-out top-1, ties broken by the
    cross-entropy), retrains it on all of `train` when `refit`,
    and reports its top-1 on `test`. Reads features only in batches of `batch_size` rows."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    fit, held, num_classes = _scan(train, batch_size, val_fraction, seed, device)
    if held.count == 0:
        raise ValueError(f"the held-out {val_fraction:.0%} of {len(train)} training rows is empty: too few rows to "
                         f"choose hyperparameters; pass a larger val_fraction or more training data")
    dim = len(fit.mean)
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(train) / batch_size)))

    start = time.perf_counter()
    heads = LinearHeads(dim, num_classes, [g[0] for g in grid], [g[1] for g in grid]).to(device)
    mean, inv_std = fit.mean_and_inverse_std()
    steps = _train_heads(train, heads, mean, inv_std, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                         keep=(val_fraction, seed, False))
    val_correct, val_loss, val_rows = _score_heads(train, heads, mean, inv_std, batch_size=batch_size,
                                                   device=device, keep=(val_fraction, seed, True))
    val_top1 = (100.0 * val_correct.double() / val_rows).tolist()
    val_loss = (val_loss / val_rows).tolist()
    if select == "loss":
        best = min(range(len(grid)), key=lambda h: (val_loss[h], -val_correct[h], h))
    elif select == "accuracy":
        best = min(range(len(grid)), key=lambda h: (-val_correct[h], val_loss[h], h))
    else:
        raise ValueError(f"select must be 'loss' or 'accuracy', got {select!r}")
    lr, wd = grid[best]
    sweep_seconds, start = time.perf_counter() - start, time.perf_counter()

    if refit:
        heads = LinearHeads(dim, num_classes, [lr], [wd]).to(device)
        mean, inv_std = fit.merged(held).mean_and_inverse_std()
        steps += _train_heads(train, heads, mean, inv_std, epochs=epochs, batch_size=batch_size, seed=seed,
                              device=device)
        chosen = 0
    else:
        chosen = best
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    refit_seconds = time.perf_counter() - start
    test_correct, _, test_rows = _score_heads(test, heads, mean, inv_std, batch_size=batch_size, device=device)
    return LinearProbeResult(
        top1=100.0 * int(test_correct[chosen]) / max(test_rows, 1), val_top1=val_top1[best], lr=lr, weight_decay=wd,
        epochs=epochs, steps=steps, dim=dim, batch_size=batch_size,
        train_rows=fit.count + held.count if refit else fit.count, val_rows=val_rows,
        test_rows=test_rows, refit=refit, select=select, device=str(device),
        sweep_seconds=sweep_seconds, refit_seconds=refit_seconds if refit else 0.0,
        sweep=[{"lr": g[0], "weight_decay": g[1], "val_top1": v, "val_loss": l}
               for g, v, l in zip(grid, val_top1, val_loss)])
