"""Inference speed of flexpredict_vit_b16 against timm's vit_base_patch16_224, and the import overhead.

    python benchmarks/bench_inference.py --device cpu --batch-size 8 --dtype fp32 --rounds 8
    python benchmarks/bench_inference.py --device cuda --batch-size 256 --dtype bf16 --compile --json

Both models are built in this process with the same options (random weights, num_classes=0, eval mode,
torch.inference_mode, same batch and dtype) and timed in interleaved rounds (A B B A ...), so drift in
clock speed or load hits both equally; the reported throughput is the median over rounds. The import
overhead is the median over fresh interpreters of the time `import flexpredict_zoo` takes after `import timm`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

CANDIDATE, BASELINE = "flexpredict_vit_b16", "vit_base_patch16_224"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, device: torch.device, dtype: torch.dtype, compile_model: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    import timm
    import flexpredict_zoo  # noqa: F401
    model = timm.create_model(name, pretrained=False, num_classes=0).to(device=device, dtype=dtype).eval()
    return torch.compile(model) if compile_model else model


def time_round(model, images: torch.Tensor, iterations: int) -> float:
    """Images per second over `iterations` forward passes."""
    _sync(images.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(iterations):
            model(images)
    _sync(images.device)
    return images.shape[0] * iterations / (time.perf_counter() - start)


def measure_throughput(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)
    models = {name: build(name, device, dtype, args.compile) for name in (CANDIDATE, BASELINE)}
    with torch.inference_mode():
        for model in models.values():  # warmup (and compilation)
            for _ in range(args.warmup):
                model(images)
    _sync(device)
    rates: Dict[str, List[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # A B, B A, ...
        for name in order:
            rates[name].append(time_round(models[name], images, args.iterations))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = [a / b for a, b in zip(rates[CANDIDATE], rates[BASELINE])]
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype, "batch_size": args.batch_size,
            "compile": args.compile, "rounds": args.rounds, "iterations": args.iterations,
            "images_per_second": medians, "images_per_second_all": rates,
            "ratio": medians[CANDIDATE] / medians[BASELINE], "ratio_of_paired_rounds_median": statistics.median(ratios),
            "ratio_of_best": max(rates[CANDIDATE]) / max(rates[BASELINE])}


def _run_seconds(code: str) -> float:
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def measure_import(repeats: int) -> Dict[str, float]:
    """Fresh interpreters. The extra cost is timed directly (`import flexpredict_zoo` after `import timm` in the
    same process) rather than as a difference of two whole-import times, which on a loaded machine is noise."""
    timm_only, extra = [], []
    for _ in range(repeats):
        timm_only.append(_run_seconds("import time; t = time.perf_counter(); import timm; print(time.perf_counter() - t)"))
        extra.append(_run_seconds("import time, timm; t = time.perf_counter(); import flexpredict_zoo; "
                                  "print(time.perf_counter() - t)"))
    return {"import_timm_s": statistics.median(timm_only), "extra_import_s": statistics.median(extra)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--warmup", type=int, default=2, help="forward passes per model before timing")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds per model")
    parser.add_argument("--iterations", type=int, default=1, help="forward passes per round")
    parser.add_argument("--import-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_throughput(args)
    result.update(measure_import(args.import_repeats) if args.import_repeats > 0 else {})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ips = result["images_per_second"]
    print(f"device {result['device_name']} ({result['threads']} threads), {args.dtype}, batch {args.batch_size}, "
          f"compile {args.compile}, {args.rounds} rounds x {args.iterations} passes (median)")
    print(f"| {'what':<36} | {'value':>10} |\n|{'-' * 38}|{'-' * 12}|")
    rows = [(f"{CANDIDATE} images/s", f"{ips[CANDIDATE]:.2f}"), (f"{BASELINE} images/s", f"{ips[BASELINE]:.2f}"),
            ("ratio (target >= 0.98)", f"{result['ratio']:.3f}"),
            ("ratio, median of paired rounds", f"{result['ratio_of_paired_rounds_median']:.3f}"),
            ("ratio of best rounds", f"{result['ratio_of_best']:.3f}")]
    if "extra_import_s" in result:
        rows += [("import timm (s)", f"{result['import_timm_s']:.3f}"),
                 ("+ import flexpredict_zoo (s)", f"{result['extra_import_s']:.3f}")]
    for what, value in rows:
        print(f"| {what:<36} | {value:>10} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
