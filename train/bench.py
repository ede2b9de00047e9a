"""`flexpredict-train bench`: time the StoP train step and count its FLOPs.

    flexpredict-train bench --config vit_b16 --batch-size 128 --steps 50            # GPU: compiled, bf16
    flexpredict-train bench --config tiny_cpu --steps 3 --no-compile --json         # CPU smoke run
    flexpredict-train bench --config vit_b16 --batch-size 128 --breakdown            # + each part of the step alone
    flexpredict-train bench --config vit_b16 --batch-size 128 --device cpu --flops-only --breakdown  # FLOPs, no GPU

The step is engine.Trainer.train_step on its model.StoPModel (the code that trains), built on a synthetic dataset
in a throwaway run folder; compilation and FLOP counting go through the StoPModel. With `--data synthetic` the images are random tensors already
on the device and the masks come from the real multi-block collator, sampled beforehand (a pool of `--mask-sets`
batches, cycled), so the figure is the step alone. With `--data FOLDER` each timed step also loads its batch:
the CPU DataLoader path (`--decode cpu`, the official PIL augmentations) or the GPU decode path (`--decode gpu`).

Model FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over eager steps on 2 images with each
pool's masks, forward and backward, activation checkpointing off (model FLOPs, no recompute), then scaled to the
batch (every operation of the step is per image). MFU = model FLOP/s / --peak-tflops (989: H100 bf16 dense).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .config import COMPILE_MODES

H100_BF16_DENSE_TFLOPS = 989.0

__all__ = ["add_arguments", "run", "benchmark", "count_step_flops", "format_result"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="config file or packaged name (vit_b16, tiny_cpu, ...)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides key.sub=value")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: data.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (images on the device) or an image FOLDER")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                        help="with --data FOLDER: CPU workers with PIL augmentations, or workers reading bytes and "
                             "the device decoding and augmenting (gpu_data.py)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.num_workers)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the encoders and predictor (default: on for CUDA, off for CPU)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="Dynamo backend (inductor; aot_eager for a quick CPU check of the compiled path)")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode (default: the config's run.compile_mode, else Inductor's default); "
                             "with CUDA graphs (reduce-overhead, max-autotune) give --warmup >= --mask-sets, so that "
                             "every mask length pair is recorded before the timing")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPUs that have it, fp32 on CPU) | bf16 | fp16 | fp32")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in the encoders and predictor (for ViT-H memory)")
    parser.add_argument("--mask-sets", type=int, default=4, help="distinct mask batches cycled through")
    parser.add_argument("--flop-sets", type=int, default=8,
                        help="mask sets whose FLOPs are counted (their mean per image is used for all steps)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the device's dense peak for MFU (989 = H100 SXM bf16)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part of the step alone (target encoder, context encoder forward + "
                             "backward, predictor + loss forward + backward, optimizer, EMA) with its FLOPs")
    parser.add_argument("--flops-only", action="store_true",
                        help="count the step's FLOPs (and each part's with --breakdown) and the masks' token counts, "
                             "without compiling or timing: cheap on a CPU at the recipe's batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _build_trainer(args: argparse.Namespace, run_dir: str):
    from .config import load_config
    from .engine import Trainer

    # the data source goes in as overrides, so that validation sees it (a folder config without data.root is refused)
    source = (["data.dataset=synthetic"] if args.data == "synthetic" else
              ["data.dataset=folder", f"data.root={args.data}", f"data.decode={args.decode}"])
    cfg = load_config(args.config, source + list(args.overrides))
    batch = args.batch_size or cfg.data.batch_size
    cfg.data.batch_size = batch
    cfg.run.output_dir = run_dir
    cfg.run.resume = False
    cfg.run.init_from = None
    cfg.run.compile = False  # compiled below through a counting backend
    cfg.run.device = args.device
    cfg.run.precision = args.precision
    cfg.run.max_steps = None
    cfg.model.grad_checkpointing = bool(args.grad_checkpointing)
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    if args.data == "synthetic":
        cfg.data.synthetic_size = batch  # never read in the timed loop; just enough to build the Trainer
        cfg.data.num_workers = 0
    cfg.optim.iterations_per_epoch = None
    trainer = Trainer(cfg)
    if args.grad_checkpointing:
        trainer.model.set_grad_checkpointing(True)
    return cfg, trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """`seconds` between entering and leaving: on a GPU the device time between two CUDA events (what was queued in
    between, waited for on leaving), on the CPU wall time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Optional[float] = None

    def __enter__(self) -> "_Timer":
        if self.device.type == "cuda":
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._events[0].record()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._events[1].record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._start


def count_step_flops(trainer: Any, mask_sets: Sequence[Tuple[List[torch.Tensor], List[torch.Tensor]]],
                     images: torch.Tensor, sample: int = 2) -> float:
    """Mean model FLOPs per image of one train step (forward + backward of every network, no recompute), counted
    on eager steps of `sample` images with each mask set's first rows; every operation is per image, so FLOPs
    scale exactly with the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    with _no_recompute(trainer):
        for context_masks, target_masks in mask_sets:
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(images[:sample], [m[:sample] for m in context_masks],
                                   [m[:sample] for m in target_masks], trainer.iteration)
            total += counter.get_total_flops() / sample
    return total / len(mask_sets)


@contextlib.contextmanager
def _no_recompute(trainer: Any):
    """Activation checkpointing off while FLOPs are counted (model FLOPs count no recompute), restored after."""
    networks = trainer.model.networks().values()
    checkpointing = [network.grad_checkpointing for network in networks]
    trainer.model.set_grad_checkpointing(False)
    try:
        yield
    finally:
        for network, enabled in zip(networks, checkpointing):
            network.set_grad_checkpointing(enabled)


# ------------------------------------------------------------------------------------------- step breakdown
PARTS = ("targets", "context", "predictor", "optimizer", "ema")


def run_part(trainer: Any, part: str, images: torch.Tensor, context_masks: Sequence[torch.Tensor],
             target_masks: Sequence[torch.Tensor], held: Dict[str, torch.Tensor]) -> None:
    """One part of trainer.train_step, computed as the step computes it (model.StoPModel.forward cut at its three
    network calls, then the update). `held` carries what a later part takes from an earlier one for these masks
    (the targets, the context tokens). Parts, in step order:
      targets    the target encoder on all tokens, layer norm, gathered at the target blocks (no gradients)
      context    the context encoder on the kept tokens, forward and backward (gradient of ones at its output)
      predictor  the predictor and the loss, forward and backward (down to the context tokens, as in the step)
      optimizer  the optimizer step on the gradients present (grads are not cleared, so it can be repeated)
      ema        the target encoder's EMA update"""
    model = trainer.model
    if part == "targets":
        with torch.no_grad(), trainer.autocast():
            held["targets"] = model.compute_targets(images, target_masks, len(context_masks))
    elif part == "context":
        with trainer.autocast():
            context = model.encode_context(images, context_masks)
        context.backward(torch.ones_like(context))
        held["context"] = context.detach()
    elif part == "predictor":
        context = held["context"].detach().requires_grad_(True)
        with trainer.autocast():
            loss = model.loss(model.predict(context, context_masks, target_masks), held["targets"])
        trainer.scaler.scale(loss).backward()
    elif part == "optimizer":
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    elif part == "ema":
        model.update_target(trainer.schedule.momentum(trainer.iteration))
    else:
        raise ValueError(f"unknown step part {part!r}; parts: {', '.join(PARTS)}")


def count_part_flops(trainer: Any, mask_sets: Sequence[Tuple[List[torch.Tensor], List[torch.Tensor]]],
                     images: torch.Tensor, sample: int = 2) -> Dict[str, float]:
    """Mean model FLOPs per image of each part (run_part), counted eagerly as count_step_flops counts the step."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = dict.fromkeys(PARTS, 0.0)
    with _no_recompute(trainer):
        for context_masks, target_masks in mask_sets:
            held: Dict[str, torch.Tensor] = {}
            trainer.optimizer.zero_grad(set_to_none=True)
            for part in PARTS:
                with FlopCounterMode(display=False) as counter:
                    run_part(trainer, part, images[:sample], [m[:sample] for m in context_masks],
                             [m[:sample] for m in target_masks], held)
                totals[part] += counter.get_total_flops() / sample
    trainer.optimizer.zero_grad(set_to_none=True)
    return {part: total / len(mask_sets) for part, total in totals.items()}


def time_parts(trainer: Any, mask_sets: Sequence[Tuple[List[torch.Tensor], List[torch.Tensor]]],
               images: torch.Tensor, iterations: int) -> Dict[str, float]:
    """Milliseconds per step of each part run alone, `iterations` times over the mask sets (device time between two
    events on CUDA, wall time on CPU). Gradients are cleared before each backward part, as the step starts
    without gradients (accumulating into existing ones would add work the step does not do)."""
    device = trainer.device
    held = [{} for _ in mask_sets]
    for (context_masks, target_masks), h in zip(mask_sets, held):  # every input a later part needs, untimed
        for part in ("targets", "context"):
            run_part(trainer, part, images, context_masks, target_masks, h)
    times = {}
    for part in PARTS:
        clear = part in ("context", "predictor")
        if part == "optimizer":  # a whole step's gradients (both backward parts once), stepped on repeatedly
            trainer.optimizer.zero_grad(set_to_none=True)
            for backward_part in ("context", "predictor"):
                run_part(trainer, backward_part, images, *mask_sets[0], held[0])
        _sync(device)
        with _Timer(device) as timer:
            for i in range(iterations):
                if clear:
                    trainer.optimizer.zero_grad(set_to_none=True)
                j = i % len(mask_sets)
                run_part(trainer, part, images, *mask_sets[j], held[j])
        times[part] = 1000 * timer.seconds / iterations
    trainer.optimizer.zero_grad(set_to_none=True)
    return times


def _breakdown(times_ms: Dict[str, float], flops: Dict[str, float], batch: int, step_ms: float,
               peak_tflops: float) -> Dict[str, Any]:
    parts = {}
    for part in PARTS:
        tflops = flops[part] * batch / (times_ms[part] / 1000) / 1e12 if times_ms[part] > 0 else 0.0
        parts[part] = {"ms": times_ms[part], "gflop_per_image": flops[part] / 1e9, "tflops": tflops,
                       "mfu": tflops / peak_tflops}
    total = sum(times_ms.values())
    return {"parts": parts, "sum_of_parts_ms": total, "step_ms": step_ms}


def mask_token_counts(mask_sets: Sequence[Tuple[List[torch.Tensor], List[torch.Tensor]]]) -> Dict[str, Any]:
    """Kept context tokens and target-block tokens per batch over the mask sets (min, mean, max), and how many
    distinct (context, target) length pairs they hold (the shapes a compiled step meets)."""
    context = [masks[0].shape[1] for masks, _ in mask_sets]
    target = [masks[0].shape[1] for _, masks in mask_sets]
    summary = lambda values: [min(values), sum(values) / len(values), max(values)]
    return {"batches": len(mask_sets), "context": summary(context), "target": summary(target),
            "distinct_pairs": len(set(zip(context, target)))}


def _peak_memory(device: torch.device) -> Tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # ru_maxrss: KiB


def _synthetic_batches(trainer: Any, batch: int, sets: int):
    device = trainer.device
    images = torch.randn(batch, 3, trainer.cfg.model.img_size, trainer.cfg.model.img_size, device=device)
    pool = []
    for _ in range(sets):
        context_masks, target_masks = trainer.mask_collator.sample(batch)
        pool.append(([m.to(device) for m in context_masks], [m.to(device) for m in target_masks]))
    return images, pool


def _folder_batches(trainer: Any, args: argparse.Namespace):
    """An endless iterator of (images, context_masks, target_masks) on the device, from the folder: the training
    data path itself (data.decode cpu or gpu), seeded samples, masks per iteration, persistent workers."""
    epoch = 0
    while True:
        yield from trainer.batches(epoch)
        epoch += 1


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    from .compile import CompileCounter, compile_model, dynamo_stats, reset_compiler

    with tempfile.TemporaryDirectory(prefix="flexpredict-bench-") as run_dir:
        cfg, trainer = _build_trainer(args, run_dir)
        device = trainer.device
        use_compile = args.compile if args.compile is not None else device.type == "cuda"
        batch = cfg.data.batch_size
        images, pool = _synthetic_batches(trainer, batch, max(1, args.mask_sets))
        flops_per_image = count_step_flops(trainer, pool[:max(1, args.flop_sets)], images)
        part_flops = count_part_flops(trainer, pool[:max(1, args.flop_sets)], images) if args.breakdown else None
        if args.flops_only:
            return {"config": str(args.config), "model": cfg.model.name, "predictor_depth": cfg.predictor.depth,
                    "batch_size": batch, "gflop_per_image": flops_per_image / 1e9, "flop_sets": min(len(pool),
                    max(1, args.flop_sets)), "mask_tokens": mask_token_counts(pool),
                    **({"part_gflop_per_image": {k: v / 1e9 for k, v in part_flops.items()}} if part_flops else {})}

        counter = None
        compile_mode = args.compile_mode or cfg.run.compile_mode
        if use_compile:
            reset_compiler()
            counter = compile_model(trainer.model, CompileCounter(args.compile_backend, mode=compile_mode))
            trainer.compile_counter = counter  # train_step marks each step for CUDA graphs through it
        source = None if args.data == "synthetic" else _folder_batches(trainer, args)

        def step(i: int):
            if source is None:
                context_masks, target_masks = pool[i % len(pool)]
                return trainer.train_step(images, context_masks, target_masks, i)
            batch_images, context_masks, target_masks = next(source)
            return trainer.train_step(batch_images, context_masks, target_masks, i)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for i in range(args.warmup):
            loss = step(i)
        _sync(device)
        warmup_s = time.perf_counter() - start
        if counter is not None:
            counter.mark_warm()
        losses = []
        with _Timer(device) as timer:
            for i in range(args.warmup, args.warmup + args.steps):
                losses.append(step(i))
        elapsed = timer.seconds
        last_loss = float(torch.stack(losses).float()[-1]) if losses else float("nan")
        memory, memory_kind = _peak_memory(device)
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
        images_per_second = batch * args.steps / elapsed
        tflops = flops_per_image * images_per_second / 1e12
        breakdown = None
        if part_flops is not None:  # after the peak memory, which is the step's; same compiled graphs, same pool
            compiles = counter.compiles if counter else 0
            breakdown = _breakdown(time_parts(trainer, pool[:8], images, max(args.steps // 4, 1)), part_flops,
                                   batch, 1000 * elapsed / args.steps, args.peak_tflops)
            breakdown["compiles_during"] = (counter.compiles if counter else 0) - compiles
        stats = dynamo_stats() if use_compile else {}
        return {
            "config": str(args.config), "model": cfg.model.name, "predictor_depth": cfg.predictor.depth,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": trainer.precision, "compile": bool(use_compile),
            "compile_mode": compile_mode if use_compile else None,
            "grad_checkpointing": bool(args.grad_checkpointing), "data": args.data if args.data == "synthetic"
            else f"folder ({args.decode} decode)", "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
            "images_per_second": images_per_second, "step_ms": 1000 * elapsed / args.steps,
            "gflop_per_image": flops_per_image / 1e9, "model_tflops": tflops,
            "mfu": tflops / args.peak_tflops, "peak_tflops": args.peak_tflops,
            "peak_memory_gb": memory, "memory_kind": memory_kind, "warmup_s": warmup_s,
            "peak_memory_reserved_gb": reserved,  # what the caching allocator held: what must fit on the card
            "compiles": counter.compiles if counter else 0, "recompiles": counter.recompiles if counter else 0,
            "graph_breaks": stats.get("graph_breaks", 0), "last_loss": last_loss,
            **({"breakdown": breakdown} if breakdown is not None else {}),
        }


def format_result(result: Dict[str, Any]) -> str:
    if "images_per_second" not in result:  # --flops-only
        tokens = result["mask_tokens"]
        rows = [("model", f"{result['model']} (predictor depth {result['predictor_depth']}), batch {result['batch_size']}"),
                ("model FLOPs", f"{result['gflop_per_image']:.2f} GFLOP/image (mean over {result['flop_sets']} mask sets)")]
        for part, gflop in result.get("part_gflop_per_image", {}).items():
            rows.append((f"  {part}", f"{gflop:.2f} GFLOP/image ({100 * gflop / result['gflop_per_image']:.0f}%)"))
        rows.append(("mask tokens", f"context {tokens['context'][0]}-{tokens['context'][2]} (mean "
                                    f"{tokens['context'][1]:.1f}), targets {tokens['target'][0]}-{tokens['target'][2]}"
                                    f"; {tokens['distinct_pairs']} distinct pairs in {tokens['batches']} batches"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    rows = [
        ("model", f"{result['model']} (predictor depth {result['predictor_depth']})"),
        ("device", f"{result['device']}, {result['precision']}, compile {'on' if result['compile'] else 'off'}"
                   f"{' (' + result['compile_mode'] + ')' if result.get('compile_mode') else ''}"
                   f"{', activation checkpointing' if result['grad_checkpointing'] else ''}"),
        ("data", result["data"]),
        ("batch / steps", f"{result['batch_size']} / {result['steps']} (after {result['warmup']} warm-up, "
                          f"{result['warmup_s']:.1f} s)"),
        ("images/s", f"{result['images_per_second']:,.1f} ({result['step_ms']:.1f} ms/step)"),
        ("model FLOPs", f"{result['gflop_per_image']:.2f} GFLOP/image"),
        ("model TFLOP/s", f"{result['model_tflops']:.3f}"),
        ("MFU", f"{100 * result['mfu']:.2f}% of {result['peak_tflops']:g} TFLOP/s"),
        ("peak memory", f"{result['peak_memory_gb']:.2f} GiB ({result['memory_kind']})" +
         (f", {result['peak_memory_reserved_gb']:.2f} GiB reserved" if result.get("peak_memory_reserved_gb") else "")),
        ("compiles / recompiles", f"{result['compiles']} / {result['recompiles']} "
                                  f"(graph breaks {result['graph_breaks']})"),
        ("last loss", f"{result['last_loss']:.4f}"),
    ]
    breakdown = result.get("breakdown")
    if breakdown:
        for part, figures in breakdown["parts"].items():
            rows.append((f"  {part}", f"{figures['ms']:.2f} ms, {figures['gflop_per_image']:.2f} GFLOP/image, "
                                      f"{figures['tflops']:.1f} TFLOP/s (MFU {100 * figures['mfu']:.1f}%)"))
        rows.append(("  sum of parts", f"{breakdown['sum_of_parts_ms']:.2f} ms (step {breakdown['step_ms']:.2f} ms)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got --steps {args.steps} --warmup {args.warmup}")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is neither 'synthetic' nor an existing image folder")
    result = benchmark(args)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="flexpredict-train bench", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
