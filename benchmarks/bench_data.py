"""Data-pipeline throughput: images/s delivered with the official augmentations and the multi-block masks.

    python benchmarks/bench_data.py --workers 16 --batch-size 128 --batches 30            # on the GPU machine
    python benchmarks/bench_data.py --workers 2 --images 64 --batch-size 16 --size 160 --batches 4  # CPU check

(a) cpu: the training DataLoader path (PIL decode, data.pretraining_transform, data.pretraining_loader with
    the mask collator) in N persistent workers;
(b) gpu: the trainer's data.decode=gpu path (engine.Trainer.batches): the same data.pretraining_loader with
    workers that read file bytes (gpu_data.JpegBytesDataset, collate_jpeg_bytes), then gpu_data.decode_and_augment
    per batch on --device (nvJPEG on CUDA, torchvision's decoder on the CPU), draws seeded by iteration.
Without --folder, synthetic 500x375 JPEGs (textured noise, about 80 KB at quality 90) are written to a temporary
folder. The first batch (worker start-up) is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


def _write_jpeg(args) -> int:
    from PIL import Image
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.normal(0, 6, size=image.shape), 0, 255).astype(np.uint8)  # fine grain, like photos
    Image.fromarray(image).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def make_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, processes: int = 8) -> float:
    """Write `count` synthetic JPEGs into folder/synthetic/ (one class); returns their mean size in KB."""
    target = folder / "synthetic"
    target.mkdir(parents=True, exist_ok=True)
    jobs = [(str(target / f"{i:06d}.jpg"), width, height, i) for i in range(count)]
    with Pool(max(1, processes)) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=16)
    return float(np.mean(sizes)) / 1000


def _mask_collator(img_size: int, patch_size: int = 16):
    from flexpredict_zoo.train.masks import MaskConfig, MultiBlockMaskCollator
    return MultiBlockMaskCollator(MaskConfig(input_size=img_size, patch_size=patch_size), seed=0)


def _timed(iterator, batches: int, device: torch.device) -> Dict[str, float]:
    """images/s over `batches` batches after the first (untimed: worker start-up)."""
    count = 0
    next(iterator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        images = next(iterator)
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images_per_second": count / elapsed, "images": count, "seconds": elapsed}


def _cycle(loader, pick):
    """pick(batch) of data.pretraining_loader's batches, endlessly; a batch with nothing readable is skipped."""
    while True:
        for batch in loader:
            picked = pick(batch) if batch[0] is not None else None
            if picked is not None:
                yield picked


def _loader(dataset, workers: int, batch_size: int, img_size: int, **kwargs):
    """data.pretraining_loader as the trainer builds it, one process, seed 0."""
    from flexpredict_zoo.train.data import pretraining_loader
    from flexpredict_zoo.train.distributed import ResumableDistributedSampler
    return pretraining_loader(dataset, ResumableDistributedSampler(dataset, 1, 0), _mask_collator(img_size),
                              batch_size=batch_size, iterations_per_epoch=len(dataset) // batch_size,
                              num_workers=workers, seed=0, **kwargs)


def bench_cpu_path(root: Path, workers: int, batch_size: int, batches: int, img_size: int = 224) -> Dict[str, float]:
    from flexpredict_zoo.train.data import ImageFolderDataset, pretraining_transform
    dataset = ImageFolderDataset(root, transform=pretraining_transform(img_size))
    loader = _loader(dataset, workers, batch_size, img_size, pin_memory=torch.cuda.is_available())
    return _timed(_cycle(loader, lambda b: b[0][0]), batches, torch.device("cpu"))


def bench_gpu_path(root: Path, workers: int, batch_size: int, batches: int, device: torch.device,
                   img_size: int = 224) -> Dict[str, float]:
    from flexpredict_zoo.train.gpu_data import GpuAugment, JpegBytesDataset, collate_jpeg_bytes, decode_and_augment
    from flexpredict_zoo.train.masks import derive_seed
    loader = _loader(JpegBytesDataset(root), workers, batch_size, img_size, collate=collate_jpeg_bytes)
    augment = GpuAugment(img_size=img_size)

    def decode(batch):
        (data, _, paths), context_masks, target_masks, _, iteration = batch
        return decode_and_augment(data, paths, context_masks, target_masks, augment, device,
                                  seed=derive_seed(0, 0, iteration, "gpu-augment"))[0]  # the trainer's seed, rank 0

    result = _timed(_cycle(loader, decode), batches, device)
    result["split"] = _gpu_path_split(loader, augment, device, min(batches, 8))
    return result


def _gpu_path_split(loader, augment, device: torch.device, batches: int) -> Dict[str, float]:
    """images/s of each piece of the GPU path alone, to show which one limits it: the DataLoader delivering file
    bytes and masks (workers), the decode of those bytes (nvJPEG on CUDA), and the augmentation of decoded images;
    decode and augment run on batches already in memory, back to back, with one device sync at the end."""
    from flexpredict_zoo.train.gpu_data import decode_images

    def rate(count: int, start: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count / (time.perf_counter() - start)

    held, count = [], 0
    stream = _cycle(loader, lambda batch: (batch[0][0], batch[0][2]))  # (file bytes, paths)
    next(stream)  # worker start-up, untimed
    start = time.perf_counter()
    for _ in range(batches):
        data, paths = next(stream)
        held.append((data, paths))
        count += len(data)
    split = {"loader_bytes": count / (time.perf_counter() - start)}
    start = time.perf_counter()
    decoded = [decode_images(data, device, names=paths)[0] for data, paths in held]
    split["decode"] = rate(count, start)
    start = time.perf_counter()
    for i, images in enumerate(decoded):
        augment(images, seed=i)
    split["augment"] = rate(sum(map(len, decoded)), start)
    return split


def run(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    results: Dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  "workers": args.workers, "batch_size": args.batch_size, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="flexpredict-jpegs-") as tmp:
        root = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            results["jpeg_kb"] = make_jpegs(root, args.images, processes=min(16, os.cpu_count() or 1))
            results["images_in_folder"] = args.images
        paths = ("cpu", "gpu") if args.path == "both" else (args.path,)
        if "cpu" in paths:
            results["cpu_path"] = bench_cpu_path(root, args.workers, args.batch_size, args.batches, args.size)
        if "gpu" in paths:
            results["gpu_path"] = bench_gpu_path(root, args.workers, args.batch_size, args.batches, device, args.size)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--folder", default=None, help="image folder (default: synthetic 500x375 JPEGs in a temp dir)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs to write")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches (after one untimed)")
    parser.add_argument("--size", type=int, default=224, help="crop size")
    parser.add_argument("--path", choices=("cpu", "gpu", "both"), default="both")
    parser.add_argument("--device", default="auto", help="device of the decode path (auto: cuda if present)")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
