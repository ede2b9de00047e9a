"""Peak memory of `flexpredict-zoo extract` with patch tokens at several dataset sizes (one ten times another):
a feature store (--out DIR) holds one shard of rows at a time, so its peak does not grow with the number of
images; the single file (--out FILE.safetensors) holds them all, and its peak does (the contrast shows that the
measurement can see growth).

    python benchmarks/bench_feature_store_memory.py --images 2000 20000 --shard-size 1000

Each extraction runs in a fresh process (`python -m flexpredict_zoo.cli extract`, one process, no DataLoader
workers, so that every byte is counted in it) and reports its peak resident set size (getrusage ru_maxrss).
Images: synthetic 40x40 JPEGs written to a temporary folder; model: flexpredict_vit_m4_32 with its shipped
weights (64 patch tokens of width 128: 33 KB of features an image).

Measured on the shared 2-core CPU machine (torch 2.14.1, load average 6 to 9 from other jobs), `--images 1000
10000 --shard-size 500 --batch-size 100`: store 856 MB at 1,000 images and 843 MB at 10,000 (32 MB and 318 MB of
features written); single file 937 MB and 1,718 MB. The store's peak is flat; the file's grows with the rows it
holds (about 2.5 copies of them: the batches, their concatenation, the reordering).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import make_jpegs  # noqa: E402  (the one synthetic-image writer of the benchmarks)

MODEL = "flexpredict_vit_m4_32"
# Runs the CLI, then prints this process's peak RSS (kilobytes on Linux) as the last line.
CHILD = """
import json, resource, sys
from flexpredict_zoo.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(images: Path, out: Path, shard_size: int, batch_size: int) -> Dict[str, float]:
    argv = ["extract", MODEL, str(images), "--out", str(out), "--patch-tokens", "--batch-size", str(batch_size),
            "--workers", "0", "--device", "cpu", "--no-progress"]
    if out.suffix != ".safetensors":
        argv += ["--shard-size", str(shard_size)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise RuntimeError(f"extraction failed: {done.stderr[-2000:]}")
    written = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir()))
    return {"peak_rss_mb": report["max_rss_kb"] / 1024, "seconds": seconds, "written_mb": written / 2 ** 20}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--modes", nargs="+", choices=["store", "file"], default=["store", "file"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        for count in args.images:
            folder = Path(tmp) / f"images_{count}"
            make_jpegs(folder, count, width=40, height=40, processes=os.cpu_count() or 1)
            for mode in args.modes:
                out = Path(tmp) / (f"store_{count}" if mode == "store" else f"file_{count}.safetensors")
                result = measure(folder, out, args.shard_size, args.batch_size)
                rows.append({"images": count, "mode": mode, **result})
                print(f"{mode:>5}  {count:>7} images  peak RSS {result['peak_rss_mb']:8.1f} MB  features written "
                      f"{result['written_mb']:8.1f} MB  {result['seconds']:6.1f} s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
