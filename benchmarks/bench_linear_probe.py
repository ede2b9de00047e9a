"""Time and peak memory of the torch linear probe (`flexpredict_zoo.train.linear_probe`) on synthetic features.

    python benchmarks/bench_linear_probe.py                                  # 200,000 x 768, 100 classes, CPU
    python benchmarks/bench_linear_probe.py --source memmap --epochs 3       # features read from a file
    python benchmarks/bench_linear_probe.py --rows 1281167 --dim 3072 --classes 1000 --device cuda --json

The features are Gaussian clusters (one centre per class, unit noise; a class of 1/C of the rows), float32,
generated a chunk at a time straight into their final buffer: in memory (`--source memory`) or in a `.npy`
file read through a memory map (`--source memmap`, as a feature store is). The probe runs the default sweep
(or `--lrs` x `--weight-decays`) for `--epochs` epochs, then the refit of the chosen setting, and a test pass.

Reported: wall time of the probe alone (not the data generation); rows per second of the sweep's training
(rows x epochs / the sweep's time, all heads at once, its held-out scoring pass included); the model FLOP rate of that training (two products of
B x D by D x (heads x classes) per step: 4 D H C FLOP per row); peak resident memory (VmHWM) and the resident
memory before the probe, whose difference is what the probe itself added; and the same for anonymous memory,
which leaves out the page cache a memory map counts as resident.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from flexpredict_zoo.train import linear_probe
from flexpredict_zoo.train.linear_probe import TensorBatches, fit_linear_probe


def memory_mb() -> Dict[str, float]:
    """Resident (VmRSS), peak resident (VmHWM) and anonymous (RssAnon) memory of this process, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def synthetic(rows: int, dim: int, classes: int, seed: int, out: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Fills `out` (rows, dim) float32 with class clusters a chunk at a time; returns the labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * (2.0 / math.sqrt(dim)) * 4
    labels = torch.randint(0, classes, (rows,), generator=g)
    for start in range(0, rows, chunk):
        y = labels[start:start + chunk]
        out[start:start + len(y)] = (centres[y] + torch.randn(len(y), dim, generator=g)).numpy()
    return labels.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=linear_probe.EPOCHS)
    parser.add_argument("--min-steps", type=int, default=linear_probe.MIN_STEPS,
                        help="the probe trains at least this many steps (more epochs on small data)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(linear_probe.LEARNING_RATES))
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(linear_probe.WEIGHT_DECAYS))
    parser.add_argument("--batch-size", type=int, default=linear_probe.BATCH_SIZE)
    parser.add_argument("--source", choices=("memory", "memmap"), default="memory")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "memmap":
            train_x = np.lib.format.open_memmap(Path(tmp) / "train.npy", "w+", np.float32, (args.rows, args.dim))
        else:
            train_x = np.empty((args.rows, args.dim), np.float32)
        train_y = synthetic(args.rows, args.dim, args.classes, 0, train_x)
        if args.source == "memmap":
            train_x.flush()
            del train_x
            train_x = np.load(Path(tmp) / "train.npy", mmap_mode="r")
        test_x = np.empty((args.test_rows, args.dim), np.float32)
        test_y = synthetic(args.test_rows, args.dim, args.classes, 0, test_x)
        before = memory_mb()
        start = time.perf_counter()
        result = fit_linear_probe(TensorBatches(train_x, train_y), TensorBatches(test_x, test_y), lrs=args.lrs,
                                  weight_decays=args.weight_decays, epochs=args.epochs, min_steps=args.min_steps,
                                  batch_size=args.batch_size,
                                  device=args.device)
        seconds = time.perf_counter() - start
        after = memory_mb()

    heads = len(args.lrs) * len(args.weight_decays)
    rows_per_s = args.rows * result.epochs / result.sweep_seconds
    record = {
        "rows": args.rows, "dim": args.dim, "classes": args.classes, "heads": heads, "epochs": result.epochs,
        "batch_size": args.batch_size, "source": args.source, "device": result.device,
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "sweep_seconds": round(result.sweep_seconds, 1), "refit_seconds": round(result.refit_seconds, 1),
        "sweep_rows_per_second": round(rows_per_s), "sweep_gflops": round(rows_per_s * 4 * args.dim * heads
                                                                           * args.classes / 1e9, 1),
        "features_mb": round(args.rows * args.dim * 4 / 2**20), "rss_before_mb": round(before["VmRSS"]),
        "peak_rss_mb": round(after["VmHWM"]), "rss_anon_before_mb": round(before["RssAnon"]),
        "rss_anon_after_mb": round(after["RssAnon"]), "top1": result.top1, "val_top1": result.val_top1,
        "lr": result.lr, "weight_decay": result.weight_decay, "torch": torch.__version__}
    if args.json:
        print(json.dumps(record))
        return
    print(f"linear probe on {args.rows:,} x {args.dim} features ({record['features_mb']} MB float32, {args.source}), "
          f"{args.classes} classes, {heads} settings x {result.epochs} epochs + refit, batch {args.batch_size}, "
          f"{record['device']} ({record['threads']} threads)")
    print(f"  wall time {seconds:.1f} s (sweep {record['sweep_seconds']} s: "
          f"{record['sweep_rows_per_second']:,} rows/s, {record['sweep_gflops']} GFLOP/s; refit "
          f"{record['refit_seconds']} s)")
    print(f"  peak RSS {record['peak_rss_mb']} MB (RSS before the probe {record['rss_before_mb']} MB; anonymous "
          f"memory {record['rss_anon_before_mb']} -> {record['rss_anon_after_mb']} MB)")
    print(f"  chosen lr {result.lr:g}, weight decay {result.weight_decay:g}: held-out top-1 {result.val_top1:.2f}%, "
          f"test top-1 {result.top1:.2f}%")


if __name__ == "__main__":
    main()
