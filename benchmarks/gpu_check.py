"""Every GPU check of the training loop and feature extraction in one run, one table at the end.

    python benchmarks/gpu_check.py                 # on one H100/H200: under 6 minutes
    python benchmarks/gpu_check.py --smoke         # on CPU with tiny configs: proves the script works (< 2 min)

Stages, in priority order (a stage that would start after --budget-s seconds is reported as skipped, so the
table always prints; --only picks stages for a rerun):
  b16       StoP train step ViT-B/16, batch 128, predictor depth 6, compiled, bf16, 200 timed steps over 100
            distinct mask batches: images/s, model TFLOP/s, MFU, peak memory, compiles and recompiles
  data      data pipeline, synthetic 500x375 JPEGs (~80 KB): 16-worker CPU DataLoader (official augmentations +
            masks) and the GPU decode-and-augment path
  features  feature extraction flexpredict_vit_b16, bf16, batch 256 (eager and compiled)
  equality  50 steps from the same seed, weights, images and masks: compiled bf16 fast path vs eager fp32
            (Inductor's fallback_random, so the predictor's noise is drawn by the same generator in both)
  l16       StoP train step ViT-L/16, batch 64, predictor depth 12
  h16       StoP train step ViT-H/16, batch 64 (--h16-grad-checkpointing to turn activation checkpointing on)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("b16", "data", "features", "equality", "l16", "h16")
# Relative loss difference allowed between bf16 autocast and fp32 at every one of the 50 steps: bf16 keeps 8
# significant bits (relative rounding 2^-9 = 0.2%); summed over the step's matmuls and 50 optimizer updates,
# 2% is a few bf16 rounding steps of the loss, far below the loss's own change over those steps.
EQUALITY_RTOL = 2e-2


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
                    compile=name == "b16", compile_backend="aot_eager", device="cpu", precision="bf16")
        # smoke: only the first train stage goes through the compiled path (Dynamo tracing is slow on 2 cores)
    else:
        common = dict(compile=True, compile_backend="inductor", device="cuda", precision="bf16")
        spec = {"b16": dict(config="vit_b16", batch_size=128, steps=200, warmup=10, mask_sets=100, flop_sets=8),
                "l16": dict(config="vit_l16", batch_size=64, steps=30, warmup=5, mask_sets=20, flop_sets=4),
                "h16": dict(config="vit_h16", batch_size=64, steps=20, warmup=5, mask_sets=10, flop_sets=2,
                            grad_checkpointing=h16_ckpt)}[name]
        spec.update(common)
    reset_compiler()
    return bench.benchmark(_bench_args(**spec))


def stage_data(smoke: bool) -> Dict[str, Any]:
    import bench_data
    argv = (["--workers", "2", "--images", "64", "--batch-size", "16", "--batches", "3"] if smoke else
            ["--workers", "16", "--images", "2048", "--batch-size", "128", "--batches", "24"])
    return bench_data.run(bench_data.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def stage_features(smoke: bool) -> Dict[str, Any]:
    import timm
    import flexpredict_zoo  # noqa: F401
    device = torch.device("cpu" if smoke else "cuda")
    name, size, batch, iters = ("flexpredict_vit_m4_32", 32, 16, 3) if smoke else ("flexpredict_vit_b16", 224, 256, 30)
    model = timm.create_model(name).to(device).eval()
    images = torch.randn(batch, 3, size, size, device=device)
    out: Dict[str, Any] = {"model": name, "batch_size": batch}

    def timed(fn) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for _ in range(3):
                fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                pooled = fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
        assert pooled.shape == (batch, model.num_features)
        return batch * iters / (time.perf_counter() - start)

    out["eager_images_per_second"] = timed(model)
    out["compiled_images_per_second"] = timed(torch.compile(model, backend="aot_eager" if smoke else "inductor"))
    return out


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
        cfg.data.batch_size, cfg.data.dataset, cfg.data.synthetic_size, cfg.data.num_workers = batch, "synthetic", batch, 0
        cfg.run.output_dir, cfg.run.resume, cfg.run.compile = run_dir, False, False
        cfg.run.precision, cfg.run.device = precision, device
        return Trainer(cfg)

    def run(trainer: Trainer, masks, seed: int = 1234) -> List[float]:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        losses = []
        for i, (context_masks, target_masks) in enumerate(masks):
            g = torch.Generator().manual_seed(10_000 + i)
            images = torch.randn(batch, 3, trainer.cfg.model.img_size, trainer.cfg.model.img_size, generator=g)
            losses.append(trainer.train_step(images.to(trainer.device), context_masks, target_masks, i))
        return torch.stack(losses).float().cpu().tolist()

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, patch:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        reference = make("fp32", a)
        masks = [reference.mask_collator.sample(batch) for _ in range(steps)]
        masks = [([m.to(reference.device) for m in c], [m.to(reference.device) for m in t]) for c, t in masks]
        fast = make("bf16", b)
        same_init = all(torch.equal(p, q) for p, q in zip(reference.model.parameters(), fast.model.parameters()))
        counter = compile_model(fast.model, CompileCounter(backend))
        eager_losses = run(reference, masks)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = True
        fast_losses = run(fast, masks)
    relative = [abs(f - e) / max(abs(e), 1e-12) for f, e in zip(fast_losses, eager_losses)]
    worst = max(range(len(relative)), key=relative.__getitem__)
    return {"config": config, "batch_size": batch, "steps": steps, "same_initial_weights": same_init,
            "max_abs_diff": max(abs(f - e) for f, e in zip(fast_losses, eager_losses)),
            "max_rel_diff": relative[worst], "worst_step": worst, "rtol": EQUALITY_RTOL,
            "passed": same_init and relative[worst] <= EQUALITY_RTOL and all(map(math.isfinite, fast_losses)),
            "eager_losses": eager_losses, "fast_losses": fast_losses,
            "compiles": counter.compiles}


def _row(stage: str, result: Dict[str, Any]) -> List[List[str]]:
    if "error" in result or "skipped" in result:
        return [[stage, result.get("skipped") or result["error"], "", ""]]
    if stage in ("b16", "l16", "h16"):
        target = {"b16": ">= 3,600 img/s (~300 TFLOP/s)", "l16": ">= 1,100 img/s", "h16": "fits in 80 GB"}[stage]
        return [[f"train step {result['model']} bs{result['batch_size']} depth {result['predictor_depth']}"
                 f"{' ckpt' if result['grad_checkpointing'] else ''}",
                 f"{result['images_per_second']:,.0f} img/s, {result['model_tflops']:.1f} TFLOP/s, "
                 f"MFU {100 * result['mfu']:.1f}%, {result['peak_memory_gb']:.1f} GiB, "
                 f"{result['gflop_per_image']:.1f} GFLOP/img",
                 target, f"compiles {result['compiles']}, recompiles {result['recompiles']} over "
                         f"{result['steps']} steps; compile+warm-up {result['warmup_s']:.0f} s"]]
    if stage == "data":
        rows = []
        for key, label in (("cpu_path", f"data: {result['workers']}-worker CPU DataLoader"),
                           ("gpu_path", "data: GPU decode + augment")):
            if key in result:
                rows.append([label, f"{result[key]['images_per_second']:,.0f} img/s", ">= B/16 step rate",
                             f"batch {result['batch_size']}, JPEGs {result.get('jpeg_kb', 0):.0f} KB"])
        return rows
    if stage == "features":
        return [[f"features {result['model']} bf16 bs{result['batch_size']}",
                 f"eager {result['eager_images_per_second']:,.0f} img/s, compiled "
                 f"{result['compiled_images_per_second']:,.0f} img/s", ">= 6,600 img/s", ""]]
    if stage == "equality":
        return [[f"loss equality {result['config']} bs{result['batch_size']}, {result['steps']} steps",
                 f"max rel diff {result['max_rel_diff']:.2e} (step {result['worst_step']}), "
                 f"max abs {result['max_abs_diff']:.2e}", f"rel <= {result['rtol']:g}",
                 f"{'PASS' if result['passed'] else 'FAIL'}; same init {result['same_initial_weights']}"]]
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs: check that the script works")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no stage after this many seconds")
    parser.add_argument("--h16-grad-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="also write every stage's full result to this file")
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
    for stage in stages:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results[stage] = {"skipped": f"skipped: {elapsed:.0f} s used of the {args.budget_s:.0f} s budget"}
            continue
        t0 = time.perf_counter()
        try:
            if stage in ("b16", "l16", "h16"):
                results[stage] = stage_train(args.smoke, stage, args.h16_grad_checkpointing)
            else:
                results[stage] = {"data": stage_data, "features": stage_features, "equality": stage_equality}[stage](args.smoke)
        except Exception as error:  # one failing stage must not hide the others' figures
            traceback.print_exc()
            results[stage] = {"error": f"error: {type(error).__name__}: {str(error)[:160]}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results[stage]["stage_s"] = time.perf_counter() - t0
        print(f"[gpu_check] {stage} done in {results[stage]['stage_s']:.0f} s", flush=True)
        if args.json:  # after every stage: what was measured survives a later stage's crash or a timeout
            _write_json(args.json, device, results)
    print(f"\nFlexPredict GPU check on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s total")
    print(format_table([row for stage in stages for row in _row(stage, results[stage])]))
    failed = any("error" in r for r in results.values()) or \
        (results.get("equality", {}).get("passed") is False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
