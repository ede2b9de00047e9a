"""Every GPU check of the training loop and feature extraction in one run, one table at the end.

    bash benchmarks/gpu_check.sh --json results.json   # on one H100/H200: under 8 minutes (--budget-s 470)
    python benchmarks/gpu_check.py --smoke         # on CPU with tiny configs: proves the script works

Stages, most important figures first (a stage whose estimated time no longer fits in --budget-s is reported as
skipped, and a stage still running when the budget ends is stopped and reported as timed out, so the table always
prints and the JSON keeps every finished stage; --only picks stages for a rerun, e.g. --only l16,h16):
  b16       StoP train step ViT-B/16, batch 128, predictor depth 6, compiled, bf16, 100 timed steps over 50
            distinct mask batches: images/s, model TFLOP/s, MFU, peak memory, compiles and recompiles; then each
            part of the step alone (bench --breakdown: target encoder, context encoder, predictor + loss,
            optimizer, EMA) with its time, FLOPs and TFLOP/s, to show which part falls short (l16 and h16 too)
  e2e       the real trainer end to end: `flexpredict-train --config vit_b16 data.decode=gpu run.compile=true`,
            batch 128, on 2,560 synthetic 500x375 JPEGs written on the machine; 200 steps uninterrupted, and the
            same run killed (SIGKILL) after its checkpoint at step 100 and rerun (it resumes): the trainer's own
            images/s (median of log.csv rows after warm-up), and whether the resumed losses and final weights
            equal the uninterrupted run's
  profile   torch.profiler over 10 compiled b16 train steps after warm-up: top-15 GPU kernels by total time, GPU
            busy time vs wall time (the idle share is host overhead and gaps), kernel launches per step
  equality  50 steps from the same seed, weights, images and masks: compiled bf16 fast path vs eager fp32
            (Inductor's fallback_random, so the predictor's noise is drawn by the same generator in both); the
            images are the synthetic JPEGs, decoded and augmented (random-noise images made the loss collapse)
  data      data pipeline on the same JPEGs (~80 KB): 16-worker CPU DataLoader (official augmentations + masks) and
            the GPU decode-and-augment path
  features  feature extraction flexpredict_vit_b16 against timm's vit_base_patch16_224, bf16, batch 256, eager (as
            `flexpredict-zoo extract` runs it)
  l16       StoP train step ViT-L/16, batch 64, predictor depth 12
  h16       StoP train step ViT-H/16, batch 64, 10 steps (--h16-grad-checkpointing turns activation checkpointing on),
            the process capped at an H100 80GB's memory (81,559 MiB) on larger cards, so "fits in 80 GB" is run, not
            inferred
  b16_cudagraphs  the b16 step with run.compile_mode=reduce-overhead (CUDA graphs, one per mask length pair, all
            recorded in a 60-step warm-up over the 50 mask sets): what removing the kernel-launch overhead gives
  features_compiled  the features stage with both models torch.compiled (two compilations: last, as it is not a
            goal figure)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("b16", "e2e", "profile", "equality", "data", "features", "l16", "h16", "b16_cudagraphs", "features_compiled")
TRAIN_STAGES = ("b16", "l16", "h16", "b16_cudagraphs")  # bench of the train step (stage_train)
# Seconds each stage takes on one H200 (torch 2.11), from the first full runs there (b16's compile + warm-up 48 s,
# l16's 92 s) and, for e2e and profile, estimated from those (e2e: three trainer processes, each ~30 s of start and
# compilation with the Inductor cache warm from b16, two 1.5 GB checkpoint saves, 400 steps in all).
# A stage is skipped when its estimate no longer fits in what is left of --budget-s.
# --smoke: tiny_cpu made smaller still (the model of tests/conftest.py's TINY_TRAIN_OVERRIDES)
SMOKE_MODEL = ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "predictor.depth=1", "predictor.embed_dim=16",
               "predictor.num_heads=2"]
STAGE_ESTIMATE_S = {"b16": 65, "e2e": 150, "profile": 40, "equality": 70, "data": 25, "features": 20, "l16": 110,
                    "h16": 140, "b16_cudagraphs": 80, "features_compiled": 60}  # b16, l16, h16 and data: +5 to 10 s for the step breakdown and the data split
# Relative loss difference allowed between bf16 autocast and fp32 at every one of the 50 steps: bf16 keeps 8
# significant bits (relative rounding 2^-9 = 0.2%); summed over the step's matmuls and 50 optimizer updates,
# 2% is a few bf16 rounding steps of the loss, far below the loss's own change over those steps.
EQUALITY_RTOL = 2e-2
# An H100 SXM 80GB's memory as nvidia-smi reports it (81,559 MiB): the h16 stage's cap on larger cards
H100_80GB_BYTES = 81_559 * 2**20
# Iterations per epoch of the shipped recipes on ImageNet-1k (1,281,167 images at a global batch of 2,048): the
# equality stage schedules its 50 steps as the first 50 of such a run (learning rate still ~lr_start, EMA ~ema_start).
# With the benchmark's one-batch epochs the 15 warm-up epochs ended at step 15 and the loss collapsed towards 0.
RECIPE_ITERATIONS_PER_EPOCH = 625


def _bench_args(**kw) -> argparse.Namespace:
    from flexpredict_zoo.train import bench
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(["--config", kw.pop("config")])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def stage_train(smoke: bool, name: str, h16_ckpt: bool) -> Dict[str, Any]:
    from flexpredict_zoo.train import bench
    from flexpredict_zoo.train.compile import reset_compiler
    if smoke:
        spec = dict(config="tiny_cpu", batch_size=8, steps=3, warmup=2, mask_sets=4, flop_sets=2,
                    compile=name.startswith("b16"), compile_backend="aot_eager", device="cpu", precision="bf16",
                    breakdown=name == "b16", compile_mode="reduce-overhead" if name == "b16_cudagraphs" else None)
        # smoke: only the b16 stages go through the compiled path (Dynamo tracing is slow on 2 cores)
    else:
        # no breakdown with CUDA graphs: the parts run alone would read graph outputs a later replay overwrote
        common = dict(compile=True, compile_backend="inductor", device="cuda", precision="bf16",
                      breakdown=name != "b16_cudagraphs")
        spec = {"b16": dict(config="vit_b16", batch_size=128, steps=100, warmup=10, mask_sets=50, flop_sets=8),
                # CUDA graphs: one recording per mask length pair, so the warm-up cycles through all 50 sets first
                "b16_cudagraphs": dict(config="vit_b16", batch_size=128, steps=100, warmup=60, mask_sets=50,
                                       flop_sets=8, compile_mode="reduce-overhead"),
                "l16": dict(config="vit_l16", batch_size=64, steps=20, warmup=5, mask_sets=20, flop_sets=4),
                "h16": dict(config="vit_h16", batch_size=64, steps=10, warmup=3, mask_sets=10, flop_sets=2,
                            grad_checkpointing=h16_ckpt)}[name]
        spec = dict(common, **spec)
    reset_compiler()
    if smoke or name != "h16":
        return bench.benchmark(_bench_args(**spec))
    # "fits in 80 GB": on a larger card (the H200 has 141 GB) the process is capped at an H100 80GB's memory, so a
    # step that would not fit there runs out of memory here too, rather than being judged from a peak figure
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, H100_80GB_BYTES / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        result = bench.benchmark(_bench_args(**spec))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return dict(result, memory_cap_gib=fraction * total / 2**30)


# ------------------------------------------------------------------------------------ synthetic JPEG folder
_WORK = contextlib.ExitStack()  # temporary folders of this run, removed when main() ends
_JPEGS: Dict[bool, Tuple[Path, float, int]] = {}


def work_folder(prefix: str) -> Path:
    return Path(_WORK.enter_context(tempfile.TemporaryDirectory(prefix=f"flexpredict-gpu-check-{prefix}-")))


def jpeg_folder(smoke: bool) -> Tuple[Path, float, int]:
    """(folder, mean KB, count) of synthetic JPEGs, written once per run and shared by e2e, equality and data:
    2,560 of 500x375 (ImageNet's typical size, ~80 KB at quality 90) in 128-image batches that is 20 iterations per
    epoch; the smoke run writes 32 of 128x96."""
    if smoke not in _JPEGS:
        import bench_data  # the one synthetic-image writer of the benchmarks
        count, width, height = (32, 128, 96) if smoke else (2560, 500, 375)
        root = work_folder("jpegs")
        kb = bench_data.make_jpegs(root, count, width=width, height=height, processes=min(16, os.cpu_count() or 1))
        _JPEGS[smoke] = (root, kb, count)
    return _JPEGS[smoke]


# ------------------------------------------------------------------------------------------------ e2e
def _read_log(run_dir: Path) -> List[Dict[str, str]]:
    from flexpredict_zoo.train.logs import read_log_rows
    path = run_dir / "log.csv"
    return read_log_rows(path) if path.is_file() else []


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _TrainProcess:
    """`python -m flexpredict_zoo.train ARGV` (= flexpredict-train) in a session of its own, so that a kill reaches
    its DataLoader workers too (they hold the run folder's lock with it); output to RUN_DIR.out."""

    def __init__(self, argv: Sequence[str], run_dir: Path, env: Dict[str, str]):
        self.run_dir = run_dir
        self.output = run_dir.with_name(run_dir.name + ".out")
        self.start = time.perf_counter()
        with open(self.output, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "flexpredict_zoo.train", *argv,
                                             f"run.output_dir={run_dir}"], stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the group this class started, workers included
        self.process.wait()

    def wait(self) -> float:
        """Wait for a normal end; returns the wall time. A failure raises with the tail of the output."""
        code = self.process.wait()
        if code != 0:
            raise RuntimeError(f"flexpredict-train exited with {code}; last lines of {self.output}:\n"
                               f"{_tail(self.output)}")
        return time.perf_counter() - self.start

    def wait_for_line(self, text: str) -> None:
        """Poll RUN_DIR/train.log until it holds `text` (the process must still be running)."""
        log = self.run_dir / "train.log"
        while not (log.is_file() and text in log.read_text(errors="replace")):
            if self.process.poll() is not None:
                raise RuntimeError(f"flexpredict-train ended ({self.process.returncode}) before writing {text!r}; "
                                   f"last lines of {self.output}:\n{_tail(self.output)}")
            time.sleep(0.05)


def _images_per_second(rows: List[Dict[str, str]], after: int) -> Optional[float]:
    values = [float(r["images_per_second"]) for r in rows if int(float(r["iteration"])) > after]
    return statistics.median(values) if values else None


def _compare_weights(a: Path, b: Path) -> Tuple[bool, float]:
    """(all network tensors equal, largest absolute difference) of two run checkpoints."""
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    x, y = load(a), load(b)
    equal, worst = True, 0.0
    for key in ("encoder", "target_encoder", "predictor"):
        for name, value in x[key].items():
            other = y[key][name]
            if not torch.equal(value, other):
                equal = False
                worst = max(worst, float((value.double() - other.double()).abs().max()))
    return equal, worst


def stage_e2e(smoke: bool) -> Dict[str, Any]:
    """The real trainer with data.decode=gpu: an uninterrupted run, and a run killed after a checkpoint then rerun."""
    from flexpredict_zoo.train.gpu_data import DECODE_ON_CPU_ENV
    folder, kb, count = jpeg_folder(smoke)
    env = dict(os.environ)
    if smoke:  # tiny model on CPU; the CPU decoder stands in for nvJPEG (a test-only switch). 32 images / batch 8:
        # killed after the checkpoint at 3 (mid-epoch), the rerun crosses the epoch boundary at 4
        steps, checkpoint, log_every, warm = 8, 3, 1, 1
        argv = ["--config", "tiny_cpu", *SMOKE_MODEL, "data.dataset=folder", "data.batch_size=8",
                "data.num_workers=2", "optim.epochs=10", "run.device=cpu"]
        env[DECODE_ON_CPU_ENV] = "1"
    else:  # the shipped recipe, compiled, at the b16 stage's batch
        steps, checkpoint, log_every, warm = 200, 100, 10, 30
        argv = ["--config", "vit_b16", "data.batch_size=128", "run.compile=true"]
    argv += [f"data.root={folder}", "data.decode=gpu", f"run.max_steps={steps}", f"run.checkpoint_every={checkpoint}",
             f"run.log_every={log_every}"]
    runs = work_folder("e2e")
    out: Dict[str, Any] = {"command": "flexpredict-train " + " ".join(argv), "steps": steps,
                           "checkpoint_every": checkpoint, "jpegs": count, "jpeg_kb": kb,
                           "warmup_iterations_left_out": warm}
    processes: List[_TrainProcess] = []
    try:
        straight = _TrainProcess(argv, runs / "straight", env)
        processes.append(straight)
        out["straight_wall_s"] = straight.wait()
        straight_rows = _read_log(runs / "straight")
        out["images_per_second"] = _images_per_second(straight_rows, warm)  # the trainer's own figure

        killed = _TrainProcess(argv, runs / "resumed", env)
        processes.append(killed)
        killed.wait_for_line(f"saved checkpoint at iteration {checkpoint}")
        killed.kill()
        out["killed_returncode"] = killed.process.returncode
        out["killed_after_iteration"] = max((int(float(r["iteration"])) for r in _read_log(runs / "resumed")),
                                            default=0)
        resumed = _TrainProcess(argv, runs / "resumed", env)
        processes.append(resumed)
        out["resumed_wall_s"] = resumed.wait()
    finally:
        for process in processes:
            process.kill()
    resumed_at = re.search(r"resumed from \S+ at iteration (\d+)", (runs / "resumed" / "train.log").read_text(errors="replace"))
    out["resumed_at_iteration"] = int(resumed_at.group(1)) if resumed_at else None
    resumed_rows = _read_log(runs / "resumed")
    iterations = [int(float(r["iteration"])) for r in resumed_rows]
    out["log_rows_once_each"] = iterations == sorted(set(iterations))
    out["resumed_images_per_second"] = _images_per_second(resumed_rows, checkpoint + warm)
    after = lambda rows: {int(float(r["iteration"])): r for r in rows if int(float(r["iteration"])) > checkpoint}
    a, b = after(straight_rows), after(resumed_rows)
    out["compared_iterations"] = sorted(a)
    out["straight_losses"] = [float(a[i]["loss_last"]) for i in sorted(a)]
    out["resumed_losses"] = [float(b[i]["loss_last"]) for i in sorted(b)]
    diffs = [abs(float(a[i][k]) - float(b[i][k])) for i in a if i in b for k in ("loss", "loss_last")]
    out["losses_equal"] = sorted(a) == sorted(b) and bool(a) and max(diffs) == 0.0
    out["loss_max_abs_diff"] = max(diffs) if diffs else None
    out["weights_equal"], out["weights_max_abs_diff"] = _compare_weights(
        runs / "straight" / "checkpoints" / "latest.pt", runs / "resumed" / "checkpoints" / "latest.pt")
    return out


# ------------------------------------------------------------------------------------------------ profile
def _union_us(intervals: List[Tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def stage_profile(smoke: bool) -> Dict[str, Any]:
    """torch.profiler over compiled b16 train steps after warm-up (smoke: eager tiny steps, CPU ops only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from flexpredict_zoo.train import bench
    from flexpredict_zoo.train.compile import CompileCounter, compile_model, reset_compiler
    spec = (dict(config="tiny_cpu", overrides=SMOKE_MODEL, batch_size=8, device="cpu", precision="fp32",
                 compile=False) if smoke else
            dict(config="vit_b16", batch_size=128, device="cuda", precision="bf16", compile=True))
    warmup, steps = (1, 2) if smoke else (8, 10)
    args = _bench_args(**spec)
    reset_compiler()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, trainer = bench._build_trainer(args, run_dir)
        try:
            device = trainer.device
            images, pool = bench._synthetic_batches(trainer, cfg.data.batch_size, 8)
            if args.compile:
                compile_model(trainer.model, CompileCounter("inductor"))

            def step(i: int) -> torch.Tensor:
                context_masks, target_masks = pool[i % len(pool)]
                return trainer.train_step(images, context_masks, target_masks, i)

            for i in range(warmup):
                step(i)
            bench._sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for i in range(warmup, warmup + steps):
                    step(i)
                bench._sync(device)
                wall_us = (time.perf_counter() - start) * 1e6
        finally:
            trainer.close()
    events = list(prof.events())
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    out: Dict[str, Any] = {"config": args.config, "batch_size": spec["batch_size"], "compiled": spec["compile"],
                           "steps": steps, "wall_ms_per_step": wall_us / 1000 / steps,
                           "aten_ops_per_step": len(ops) / steps}
    # device events: kernels and the copies/memsets between them, on the device's own clock
    timed = kernels if kernels else [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    by_name: Dict[str, List[float]] = {}
    for e in timed:
        by_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in timed])
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    out["top_kind"] = "CUDA kernels" if kernels else "top-level CPU ops (no device events)"
    out["top"] = [{"name": name[:200], "total_ms": sum(times) / 1000, "calls_per_step": len(times) / steps,
                   "share_of_busy": sum(times) / busy_us if busy_us else None} for name, times in top]
    if kernels:
        copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in kernels)
        out["kernel_launches_per_step"] = (len(kernels) - copies) / steps
        out["copies_and_memsets_per_step"] = copies / steps
        out["gpu_busy_ms_per_step"] = busy_us / 1000 / steps
        out["gpu_idle_share"] = max(0.0, 1 - busy_us / wall_us)
    return out


def stage_data(smoke: bool) -> Dict[str, Any]:
    import bench_data
    folder, kb, count = jpeg_folder(smoke)
    argv = (["--workers", "2", "--batch-size", "16", "--batches", "3"] if smoke else
            ["--workers", "16", "--batch-size", "128", "--batches", "24"])
    result = bench_data.run(bench_data.add_arguments(argparse.ArgumentParser()).parse_args(argv + ["--folder", str(folder)]))
    return dict(result, jpeg_kb=kb, images_in_folder=count)


def stage_features(smoke: bool, compiled: bool = False) -> Dict[str, Any]:
    """Feature extraction speed of flexpredict_vit_b16 against timm's vit_base_patch16_224 measured in the same run
    (bench_inference: both built alike, interleaved rounds), bf16, batch 256, eager or both compiled (smoke: eager,
    as compiling two B/16 models on a CPU takes minutes)."""
    import bench_inference
    args = argparse.Namespace(device="cpu" if smoke else "cuda", dtype="bf16", batch_size=2 if smoke else 256,
                              compile=compiled and not smoke, warmup=1 if smoke else 3, rounds=2 if smoke else 10,
                              iterations=1 if smoke else 5)
    result = bench_inference.measure_throughput(args)
    return {"model": bench_inference.CANDIDATE, "baseline": bench_inference.BASELINE, "batch_size": args.batch_size,
            "compiled" if args.compile else "eager": {
                "images_per_second": result["images_per_second"], "ratio": result["ratio"],
                "ratio_of_paired_rounds_median": result["ratio_of_paired_rounds_median"]}}


def stage_equality(smoke: bool) -> Dict[str, Any]:
    """Compiled bf16 fast path vs eager fp32, same seed/weights/images/masks/noise stream, 50 steps."""
    from flexpredict_zoo.train.compile import CompileCounter, compile_model, reset_compiler
    from flexpredict_zoo.train.config import load_config
    from flexpredict_zoo.train.engine import Trainer

    config, batch, steps = ("tiny_cpu", 8, 8) if smoke else ("vit_b16", 64, 50)
    device = "cpu" if smoke else "cuda"
    backend = "aot_eager" if smoke else "inductor"
    reset_compiler()
    patch = contextlib.nullcontext()
    if backend == "inductor":
        import torch._inductor.config as inductor_config
        patch = inductor_config.patch(fallback_random=True)  # compiled randn = eager randn, same generator

    def make(precision: str, run_dir: str) -> Trainer:
        cfg = load_config(config, ["data.dataset=synthetic"])
        cfg.data.batch_size, cfg.data.dataset, cfg.data.num_workers = batch, "synthetic", 0
        # never read (the batches come from photo_like_batches); sized so that an epoch has the recipe's iterations
        cfg.data.synthetic_size = batch * RECIPE_ITERATIONS_PER_EPOCH
        cfg.optim.iterations_per_epoch = RECIPE_ITERATIONS_PER_EPOCH
        cfg.run.output_dir, cfg.run.resume, cfg.run.compile = run_dir, False, False
        cfg.run.precision, cfg.run.device = precision, device
        return Trainer(cfg)

    def run(trainer: Trainer, masks, batches: List[torch.Tensor], seed: int = 1234) -> List[float]:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        losses = []
        for i, ((context_masks, target_masks), images) in enumerate(zip(masks, batches)):
            losses.append(trainer.train_step(images, context_masks, target_masks, i))
        return torch.stack(losses).float().cpu().tolist()

    def photo_like_batches(trainer: Trainer) -> List[torch.Tensor]:
        """The synthetic JPEGs decoded and augmented as in training (crops, flips, blur), once for both runs:
        random-noise images made the loss collapse to ~0.007 within 25 steps, where relative differences of a
        near-zero loss say nothing."""
        from flexpredict_zoo.train.gpu_data import GpuAugment, decode_images
        folder, _, _ = jpeg_folder(smoke)
        files = sorted((folder / "synthetic").glob("*.jpg"))[:batch * 8]
        data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
        decoded, _, bad = decode_images(data, trainer.device, names=[str(f) for f in files])
        assert not bad, bad
        augment = GpuAugment.from_data_config(trainer.cfg.data, trainer.cfg.model.img_size)
        return [augment([decoded[(i * batch + j) % len(decoded)] for j in range(batch)], seed=10_000 + i)
                for i in range(steps)]

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, patch:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        reference = make("fp32", a)
        lr_first_last = [reference.schedule.lr(0), reference.schedule.lr(steps - 1)]
        masks = [reference.mask_collator.sample(batch) for _ in range(steps)]
        masks = [([m.to(reference.device) for m in c], [m.to(reference.device) for m in t]) for c, t in masks]
        batches = photo_like_batches(reference)
        fast = make("bf16", b)
        same_init = all(torch.equal(p, q) for p, q in zip(reference.model.parameters(), fast.model.parameters()))
        counter = compile_model(fast.model, CompileCounter(backend))
        eager_losses = run(reference, masks, batches)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = True
        fast_losses = run(fast, masks, batches)
        reference.close()
        fast.close()
    relative = [abs(f - e) / max(abs(e), 1e-12) for f, e in zip(fast_losses, eager_losses)]
    worst = max(range(len(relative)), key=relative.__getitem__)
    return {"config": config, "batch_size": batch, "steps": steps, "images": "synthetic JPEGs, augmented",
            "same_initial_weights": same_init,
            "max_abs_diff": max(abs(f - e) for f, e in zip(fast_losses, eager_losses)),
            "max_rel_diff": relative[worst], "worst_step": worst, "rtol": EQUALITY_RTOL,
            "passed": same_init and relative[worst] <= EQUALITY_RTOL and all(map(math.isfinite, fast_losses)),
            "lr_first_last": lr_first_last, "iterations_per_epoch": RECIPE_ITERATIONS_PER_EPOCH,
            "eager_first_last": [eager_losses[0], eager_losses[-1]], "fast_first_last": [fast_losses[0], fast_losses[-1]],
            "eager_losses": eager_losses, "fast_losses": fast_losses,
            "compiles": counter.compiles}


def _breakdown_rows(result: Dict[str, Any]) -> List[List[str]]:
    """One row per part of the step (bench --breakdown): where the step's time goes and how efficiently."""
    breakdown = result.get("breakdown")
    if not breakdown:
        return []
    rows = [[f"  {part}", f"{f['ms']:.1f} ms/step, {f['tflops']:.0f} TFLOP/s (MFU {100 * f['mfu']:.0f}%)", "",
             f"{f['gflop_per_image']:.1f} GFLOP/img, {100 * f['ms'] / breakdown['sum_of_parts_ms']:.0f}% of the parts"]
            for part, f in breakdown["parts"].items()]
    rows.append(["  sum of parts", f"{breakdown['sum_of_parts_ms']:.1f} ms (step {breakdown['step_ms']:.1f} ms)", "",
                 f"compiles during the breakdown: {breakdown['compiles_during']}"])
    return rows


def _row(stage: str, result: Dict[str, Any]) -> List[List[str]]:
    if "error" in result or "skipped" in result:
        return [[stage, result.get("skipped") or result["error"], "", ""]]
    if stage in TRAIN_STAGES:
        target = {"b16": ">= 3,600 img/s (~300 TFLOP/s)", "l16": ">= 1,100 img/s", "h16": "fits in 80 GB",
                  "b16_cudagraphs": ">= 3,600 img/s"}[stage]
        reserved = result.get("peak_memory_reserved_gb")
        cap = f"; capped at {result['memory_cap_gib']:.1f} GiB" if "memory_cap_gib" in result else ""
        return [[f"train step {result['model']} bs{result['batch_size']} depth {result['predictor_depth']}"
                 f"{' ckpt' if result['grad_checkpointing'] else ''}"
                 f"{' ' + result['compile_mode'] if result.get('compile_mode') else ''}",
                 f"{result['images_per_second']:,.0f} img/s, {result['model_tflops']:.1f} TFLOP/s, "
                 f"MFU {100 * result['mfu']:.1f}%, {result['peak_memory_gb']:.1f} GiB"
                 f"{f' ({reserved:.1f} reserved{cap})' if reserved else ''}, "
                 f"{result['gflop_per_image']:.1f} GFLOP/img",
                 target, f"compiles {result['compiles']}, recompiles {result['recompiles']} over "
                         f"{result['steps']} steps; compile+warm-up {result['warmup_s']:.0f} s"]] + _breakdown_rows(result)
    if stage == "data":
        rows = []
        for key, label in (("cpu_path", f"data: {result['workers']}-worker CPU DataLoader"),
                           ("gpu_path", "data: GPU decode + augment")):
            if key in result:
                split = result[key].get("split")
                rows.append([label, f"{result[key]['images_per_second']:,.0f} img/s", ">= B/16 step rate",
                             f"batch {result['batch_size']}, JPEGs {result.get('jpeg_kb', 0):.0f} KB" +
                             (" ; alone: " + ", ".join(f"{k} {v:,.0f}" for k, v in split.items()) if split else "")])
        return rows
    if stage in ("features", "features_compiled"):
        rows = []
        for key in ("eager", "compiled"):
            if key in result:
                rates = result[key]["images_per_second"]
                rows.append([f"features {result['model']} bf16 bs{result['batch_size']} ({key})",
                             f"{rates[result['model']]:,.0f} img/s vs {result['baseline']} {rates[result['baseline']]:,.0f}: "
                             f"ratio {result[key]['ratio']:.3f}", ">= 0.98x timm", "same run, interleaved rounds"])
        return rows
    if stage == "equality":
        return [[f"loss equality {result['config']} bs{result['batch_size']}, {result['steps']} steps",
                 f"max rel diff {result['max_rel_diff']:.2e} (step {result['worst_step']}), "
                 f"max abs {result['max_abs_diff']:.2e}", f"rel <= {result['rtol']:g}",
                 f"{'PASS' if result['passed'] else 'FAIL'}; same init {result['same_initial_weights']}; loss "
                 f"{result['eager_first_last'][0]:.4f} -> {result['eager_first_last'][1]:.4f} (fp32), "
                 f"{result['fast_first_last'][0]:.4f} -> {result['fast_first_last'][1]:.4f} (bf16)"]]
    if stage == "e2e":
        same = "equal" if result["losses_equal"] else f"differ by up to {result['loss_max_abs_diff']:.2e}"
        weights = "equal" if result["weights_equal"] else f"differ by up to {result['weights_max_abs_diff']:.2e}"
        rate = result["images_per_second"]
        return [[f"trainer e2e, GPU decode, {result['steps']} steps",
                 f"{rate:,.0f} img/s (log.csv median)" if rate else "no log.csv rows after warm-up",
                 "= b16 step rate", f"{result['jpegs']} JPEGs of {result['jpeg_kb']:.0f} KB"],
                [f"trainer e2e, killed after step {result['checkpoint_every']}, rerun",
                 f"resumed losses {same}; final weights {weights}", "equal",
                 f"resumed at {result['resumed_at_iteration']}, killed after {result['killed_after_iteration']}"]]
    if stage == "profile":
        if "gpu_idle_share" not in result:
            return [[f"profile {result['config']} ({result['top_kind']})",
                     f"{result['wall_ms_per_step']:.1f} ms/step, {result['aten_ops_per_step']:.0f} aten ops/step", "",
                     f"top: {result['top'][0]['name'][:40] if result['top'] else '-'}"]]
        return [[f"profile {result['config']} bs{result['batch_size']}",
                 f"GPU idle {100 * result['gpu_idle_share']:.0f}% of {result['wall_ms_per_step']:.1f} ms/step, "
                 f"{result['kernel_launches_per_step']:.0f} kernels/step", "idle -> 0",
                 f"top kernel: {result['top'][0]['name'][:40]} "
                 f"({100 * (result['top'][0]['share_of_busy'] or 0):.0f}%)"]]
    return [[stage, json.dumps(result), "", ""]]


def _write_json(path: str, device: str, results: Dict[str, Any]) -> None:
    import timm
    from flexpredict_zoo.atomic_write import write_file_atomically
    text = json.dumps({"device": device, "torch": torch.__version__, "timm": timm.__version__, "results": results},
                      indent=1, default=str)
    write_file_atomically(Path(path), lambda tmp: tmp.write_text(text))


def format_table(rows: List[List[str]]) -> str:
    header = ["check", "result", "target", "notes"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt = lambda r: "|".join(f" {c:<{w}} " for c, w in zip(r, widths))
    return "\n".join([fmt(header), line] + [fmt(r) for r in rows])


class StageTimeout(Exception):
    """The budget ended while a stage was running."""


def _on_alarm(signum, frame):
    raise StageTimeout("the --budget-s budget ended while this stage ran")


def run_stage(stage: str, args: argparse.Namespace) -> Dict[str, Any]:
    if stage in TRAIN_STAGES:
        return stage_train(args.smoke, stage, args.h16_grad_checkpointing)
    if stage == "features_compiled":
        return stage_features(args.smoke, compiled=True)
    return {"e2e": stage_e2e, "profile": stage_profile, "data": stage_data, "features": stage_features,
            "equality": stage_equality}[stage](args.smoke)


def _timed_stage(stage: str, args: argparse.Namespace, seconds: float) -> Dict[str, Any]:
    """Run one stage, stopped after `seconds` (SIGALRM); an error or a timeout becomes the stage's result."""
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        result = run_stage(stage, args)
    except Exception as error:  # one failing stage must not hide the others' figures
        traceback.print_exc()
        kind = "timed out" if isinstance(error, StageTimeout) else "error"
        result = {"error": f"{kind}: {type(error).__name__}: {str(error)[:300]}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["stage_s"] = time.perf_counter() - t0
    print(f"[gpu_check] {stage} done in {result['stage_s']:.0f} s", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs: check that the script works")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="seconds for all stages: a stage whose estimate no longer fits is skipped, one still "
                             "running at the end is stopped (470 s: with start-up and the table, under 8 minutes)")
    parser.add_argument("--h16-grad-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="also write every stage's full result to this file (after each "
                                                     "stage, so a later failure or timeout keeps the earlier ones)")
    args = parser.parse_args(argv)
    stages = [s for s in args.only.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or use --smoke on CPU")
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    start = time.perf_counter()
    results: Dict[str, Any] = {}
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        with _WORK:
            for stage in stages:
                elapsed = time.perf_counter() - start
                left = args.budget_s - elapsed
                estimate = 0 if args.smoke else STAGE_ESTIMATE_S[stage]
                if left <= 0 or estimate > left:
                    results[stage] = {"skipped": f"skipped: {elapsed:.0f} s used of the {args.budget_s:.0f} s budget, "
                                                 f"the stage takes ~{estimate} s (rerun with --only {stage})"}
                else:
                    results[stage] = _timed_stage(stage, args, left)
                if args.json:  # after every stage: what was measured survives a later stage's crash or a timeout
                    _write_json(args.json, device, results)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        _JPEGS.clear()  # their folder went with _WORK
    print(f"\nFlexPredict GPU check on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s total")
    print(format_table([row for stage in stages for row in _row(stage, results[stage])]))
    failed = any("error" in r for r in results.values()) or \
        (results.get("equality", {}).get("passed") is False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
