"""Process-group setup from torchrun's environment, DDP wrapping and a DistributedSampler that can resume mid-epoch.

One process when WORLD_SIZE is unset (or 1); NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # whether this process created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():  # e.g. a caller that set up the group itself
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized=False)
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return DistEnv(0, 1, local_rank, device)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                           f"(torchrun --nproc_per_node=N -m flexpredict_zoo.train --config ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # device_id unknown to an older torch
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    # Rank and world size are read from the group only now, after init: the official trainer read them
    # before init_process_group, got rank 0 of 1 everywhere, so every GPU iterated the whole dataset.
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized=True)


def cleanup(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(env: Optional[DistEnv] = None) -> None:
    if is_distributed():
        if env is not None and env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # Wraps the whole model.StoPModel: gradients of every parameter that requires one (context encoder, predictor)
    # are averaged across ranks; the target encoder has none and is updated by EMA identically on every rank.
    # static_graph: the predictor's mask_token is an (official, unused) parameter, and activation
    # checkpointing re-enters the graph; both are fine with a static graph.
    return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


class SampleKey(NamedTuple):
    """What the training sampler yields for one sample: the dataset `index`, the `epoch`, and the `position` of the
    sample in this process's order for the epoch. data.SeededSamples seeds the sample's augmentations from
    (seed, epoch, index) and data.CollateWithUnreadable the batch's masks from its iteration (epoch and position),
    so neither depends on which DataLoader worker, or which run of a resumed training, draws them."""
    epoch: int
    index: int
    position: int


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (really sharded: rank and world size come from the initialised group) that yields
    SampleKeys and can skip the samples of batches already done in this epoch, with the same permutation, for a
    mid-epoch resume."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_start_index(self, index: int) -> None:
        self.start_index = int(index)

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())
        return (SampleKey(self.epoch, index, position)
                for position, index in enumerate(indices[self.start_index:], start=self.start_index))

    def __len__(self) -> int:
        return self.num_samples - self.start_index
