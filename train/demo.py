"""`flexpredict-train demo`: what self-supervised FlexPredict features are worth, in well under a minute on a CPU.

Loads the tiny FlexPredict ViT pretrained on scikit-learn's digits (`timm.create_model(NAME, pretrained=True)`,
weights shipped inside the package), extracts frozen pooled features of the digits' training split (1,297) and
held-out split (500), and prints k-NN, linear-probe and few-shot top-1 on the held-out split for three
representations: the pretrained encoder, the same architecture at random initialisation, and raw pixels.
It writes two pictures, drawn with matplotlib by `flexpredict_zoo.show`: `pca_patches.png` (the first 3 principal
components of the patch features as RGB, under the input digits) and `retrievals.png` (held-out queries and their
nearest training digits), plus `results.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from flexpredict_zoo.show import Tile, draw_grid, patch_pca_rgb, require_matplotlib

from .evaluate import KNN_K, evaluate_features, eval_datasets, extract

DEFAULT_MODEL = "flexpredict_vit_m4_32.digits_stop"
GOOD, BAD = "#28aa3c", "#d22828"  # frames of retrieved digits: same class, another


# ----------------------------------------------------------------------------------------------- models
def load_models(model: str = DEFAULT_MODEL, checkpoint: Optional[str] = None, seed: int = 0):
    """(pretrained encoder, the same architecture at random initialisation (seeded), a name for the table).
    `checkpoint` (instead of `model`): anything `flexpredict_zoo.encoders.load_encoder` takes."""
    from flexpredict_zoo.checkpoints import CheckpointError
    from flexpredict_zoo.encoders import resolve_encoder
    from flexpredict_zoo.manifest import UnknownModelError

    try:
        loaded = resolve_encoder(checkpoint or model)
    except (UnknownModelError, CheckpointError) as e:
        if checkpoint:
            raise
        raise CheckpointError(
            f"cannot load {model} with pretrained weights ({e}). The demo needs pretrained weights: pass "
            f"--checkpoint RUN_DIR (a folder written by `flexpredict-train --config ...`), a checkpoint file, or "
            f"a folder written by `flexpredict-train export`.") from e
    torch.manual_seed(seed)
    return loaded.model, loaded.random_init(), loaded.description


# ----------------------------------------------------------------------------------------------- pictures
def _digit_tile(pixels: torch.Tensor, frame: Optional[str] = None) -> Tile:
    """A (S, S) grey image in [0, 1] as dark ink on white paper."""
    return Tile(1 - pixels.clamp(0, 1).numpy(), cmap="gray", frame=frame)


def draw_pca_patches(models: Sequence[Tuple[str, torch.nn.Module]], images: torch.Tensor, pixels: torch.Tensor,
                     path: Path, tile: int = 112) -> Path:
    """One column per digit: the input, then the patch-feature PCA of each model (`flexpredict_zoo.show`)."""
    rows = [[_digit_tile(p) for p in pixels]]
    rows += [[Tile(rgb.numpy()) for rgb in patch_pca_rgb(model, images)] for _, model in models]
    return draw_grid(rows, path, tile_px=(tile, tile), row_labels=["input"] + [name for name, _ in models],
                     label_px=90,
                     title="PCA of patch features (first 3 components as RGB), fitted jointly over these digits")


def draw_retrievals(panels: Sequence[Tuple[str, torch.Tensor, torch.Tensor]], query_index: Sequence[int],
                    test_pixels: torch.Tensor, test_labels: torch.Tensor, train_pixels: torch.Tensor,
                    train_labels: torch.Tensor, path: Path, neighbours: int = 5, tile: int = 56) -> Path:
    """Each row: a held-out query, then its nearest training digits (cosine) under each representation;
    a green frame marks a neighbour of the query's class, a red one another class."""
    normalize = torch.nn.functional.normalize
    rows = []
    for q in query_index:
        row = [_digit_tile(test_pixels[q])]
        for _, train_feats, test_feats in panels:
            sims = normalize(train_feats, dim=1) @ normalize(test_feats[q], dim=0)
            row += [_digit_tile(train_pixels[i], GOOD if int(train_labels[i]) == int(test_labels[q]) else BAD)
                    for i in sims.topk(neighbours).indices.tolist()]
        rows.append(row)
    titles = ["query"] + [title for name, _, _ in panels
                          for title in [f"{neighbours} nearest training digits: {name}"] + [""] * (neighbours - 1)]
    return draw_grid(rows, path, tile_px=(tile, tile), column_titles=titles,
                     row_labels=[f"class {int(test_labels[q])}" for q in query_index], label_px=60,
                     title="Held-out queries and their nearest training digits (green: same class, red: another)")


# ----------------------------------------------------------------------------------------------- demo
def first_of_each_class(labels: torch.Tensor, classes: int = 10) -> List[int]:
    return [int(torch.nonzero(labels == c)[0]) for c in range(classes) if bool((labels == c).any())]


def run_demo(model: str = DEFAULT_MODEL, checkpoint: Optional[str] = None, out: str = "demo_out",
             layers: str = "last", shots: int = 5, draws: int = 10, seed: int = 0,
             device: Optional[str] = None) -> Dict[str, Any]:
    start = time.perf_counter()
    require_matplotlib()  # the pictures need it: say so before the work, not after
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pretrained, random_init, name = load_models(model, checkpoint, seed)
    train_set, test_set = eval_datasets(pretrained, "digits")
    reps = {}
    for key, encoder in (("pretrained", pretrained), ("random_init", random_init)):
        reps[key] = (*extract(encoder, train_set, layers, device), *extract(encoder, test_set, layers, device))
    # raw pixels: the 8x8 grey values scikit-learn ships (the encoder's 32x32 input is a linear upsampling of them)
    reps["pixels"] = (train_set.originals.flatten(1), train_set.labels, test_set.originals.flatten(1), test_set.labels)
    results = {key: dict(evaluate_features(*feats, k=KNN_K, shots=shots, draws=draws, seed=seed),
                         dim=int(feats[0].shape[1])) for key, feats in reps.items()}

    out_dir = Path(out).expanduser()
    cpu_models = [("FlexPredict", pretrained.cpu()), ("random init", random_init.cpu())]
    columns = first_of_each_class(test_set.labels)
    images = torch.stack([test_set[i][0] for i in columns])
    pca_path = draw_pca_patches(cpu_models, images, test_set.pixels[columns, 0], out_dir / "pca_patches.png")
    retrieval_path = draw_retrievals(
        [("FlexPredict", reps["pretrained"][0], reps["pretrained"][2]),
         ("random init", reps["random_init"][0], reps["random_init"][2])],
        columns, test_set.pixels[:, 0], test_set.labels, train_set.pixels[:, 0], train_set.labels,
        out_dir / "retrievals.png")
    seconds = time.perf_counter() - start
    record = {"model": name, "layers": layers, "dataset": "scikit-learn digits",
              "train_images": len(train_set), "heldout_images": len(test_set), "knn_k": KNN_K, "shots": shots,
              "few_shot_draws": draws, "seed": seed, "results": results, "seconds": round(seconds, 1),
              "pictures": [str(pca_path), str(retrieval_path)]}
    tmp = out_dir / f".results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / "results.json")
    return record


def format_table(record: Dict[str, Any]) -> str:
    rows = [("FlexPredict (pretrained)", "pretrained"), ("same encoder, random init", "random_init"),
            ("raw pixels (8x8 grey values)", "pixels")]
    shots = record["shots"]
    lines = [f"{record['model']} on {record['dataset']}: {record['train_images']} train / "
             f"{record['heldout_images']} held-out images; top-1 on the held-out split",
             f"(frozen features: pooled {'last layer' if record['layers'] == 'last' else 'last 4 layers'}; "
             f"k-NN k={record['knn_k']} cosine; linear = logistic regression on all training images; "
             f"{shots}-shot = linear on {shots} per class, mean ± sd of {record['few_shot_draws']} draws)", "",
             f"{'representation':<30}{'dim':>6}{'k-NN':>9}{'linear':>9}{f'{shots}-shot':>16}"]
    for title, key in rows:
        r = record["results"][key]
        lines.append(f"{title:<30}{r['dim']:>6}{r['knn_top1']:>8.1f}%{r['linear_top1']:>8.1f}%"
                     f"{r['few_shot_top1']:>9.1f}% ± {r['few_shot_std']:.1f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Frozen-feature top-1 of the tiny FlexPredict ViT pretrained on scikit-learn's digits, "
                          "against random initialisation and raw pixels, plus pictures of its features.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="zoo model with pretrained weights (default: %(default)s)")
    parser.add_argument("--checkpoint", help="use this instead: run folder, checkpoint file, exported folder, "
                                             "hf-hub:ORG/NAME or local-dir:DIR")
    parser.add_argument("--out", default="demo_out", help="folder for the pictures and results.json")
    parser.add_argument("--layers", choices=("last", "last4"), default="last")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--draws", type=int, default=10, help="random draws averaged for few-shot")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and few-shot draws")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def run(args: argparse.Namespace) -> int:
    record = run_demo(args.model, args.checkpoint, args.out, args.layers, args.shots, args.draws, args.seed,
                      args.device)
    print(format_table(record))
    print()
    for picture in record["pictures"]:
        print(f"wrote {picture}")
    print(f"wrote {Path(args.out) / 'results.json'}   ({record['seconds']:.1f} s)")
    return 0
