"""Frozen-feature evaluation of an encoder: k-NN, linear probe and few-shot top-1; `flexpredict-train eval`.

Features come from the zoo's one extractor (`flexpredict_zoo.features.extract_features`): the encoder's
mean-pooled tokens after the final LayerNorm, of the last layer (`layers="last"`), or of each of the last 4
layers concatenated (`layers="last4"`, the paper's second linear-probe number; each layer goes through the final
norm, as DINOv2's `get_intermediate_layers(norm=True)`).

    feats_train, y_train = extract(model, DigitsDataset("train"))
    feats_test, y_test = extract(model, DigitsDataset("heldout"))
    knn_top1(feats_train, y_train, feats_test, y_test)          # percent
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from flexpredict_zoo.features import (encode_batch, eval_transform, extract_features, model_data_config,
                                      normalise_layers)

from .data import DigitsDataset, ImageFolderDataset

log = logging.getLogger(__name__)
LAYERS = ("last", "last4")
KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_C = 1.0
LINEAR_MAX_ITER = 1000
SMALL_PROBLEM = 1 << 22  # features x samples below which the linear probe runs single-threaded


# ----------------------------------------------------------------------------------------------- features
def layer_indices(layers: str) -> Optional[List[int]]:
    """The blocks whose final-normed outputs make the features: None for "last" (the pooled output), the last
    four for "last4"."""
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}")
    return None if layers == "last" else [-4, -3, -2, -1]


def _layer_features(pooled: torch.Tensor, intermediates: Optional[Dict[int, torch.Tensor]],
                    blocks: Optional[List[int]]) -> torch.Tensor:
    return pooled if blocks is None else torch.cat([intermediates[i] for i in sorted(intermediates)], dim=1)


def pooled_features(model: torch.nn.Module, images: torch.Tensor, layers: str = "last") -> torch.Tensor:
    """(B, D) for "last", (B, 4 D) for "last4", of one batch (float32, on the CPU)."""
    blocks = normalise_layers(layer_indices(layers), model)
    out = encode_batch(model, images, layers=blocks)
    return _layer_features(out["pooled"], out.get("inter"), blocks)


def extract(model: torch.nn.Module, data: Dataset, layers: str = "last",
            device: Union[str, torch.device, None] = None, batch_size: int = 256,
            num_workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) float32 on the CPU and labels (N,) of a dataset of (image, label) items, through
    the zoo's extractor (unreadable images are skipped and named there). `device`: default the model's."""
    blocks = layer_indices(layers)
    result = extract_features(model, data, batch_size=batch_size, device=device or next(model.parameters()).device,
                              num_workers=num_workers, layers=blocks)
    return _layer_features(result.pooled, result.intermediates, blocks), result.labels


# ----------------------------------------------------------------------------------------------- classifiers
def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def knn_top1(train_features, train_labels, test_features, test_labels, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Weighted k-NN top-1 in percent, as DINO's evaluation: cosine similarity, the k nearest training
    features vote for their label with weight exp(similarity / temperature)."""
    train = torch.nn.functional.normalize(_as_tensor(train_features).float(), dim=1)
    test = torch.nn.functional.normalize(_as_tensor(test_features).float(), dim=1)
    train_y, test_y = _as_tensor(train_labels).long(), _as_tensor(test_labels).long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1) == test_y[start:start + chunk]).sum())
    return 100.0 * correct / len(test)


def _fit_linear(train_features, train_labels, C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    x = np.asarray(train_features, dtype=np.float64)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    # Multi-threaded BLAS on small matrices spends its time synchronising: one thread is ~10x faster here.
    with warnings.catch_warnings(), threadpool_limits(1 if x.size < SMALL_PROBLEM else None):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed iteration budget is part of the protocol
        clf.fit(x, np.asarray(train_labels))
    return clf


def linear_top1(train_features, train_labels, test_features, test_labels, C: float = LINEAR_C,
                max_iter: int = LINEAR_MAX_ITER, seed: int = 0) -> float:
    """Linear-probe top-1 in percent: multinomial logistic regression (L2, C) on standardised features."""
    clf = _fit_linear(_as_tensor(train_features).numpy(), _as_tensor(train_labels).numpy(), C, max_iter, seed)
    pred = clf.predict(np.asarray(_as_tensor(test_features).numpy(), dtype=np.float64))
    return 100.0 * float((pred == _as_tensor(test_labels).numpy()).mean())


def few_shot_top1(train_features, train_labels, test_features, test_labels, shots: int = 5, draws: int = 10,
                  seed: int = 0, C: float = LINEAR_C, max_iter: int = LINEAR_MAX_ITER,
                  return_std: bool = False) -> Union[float, Tuple[float, float]]:
    """Few-shot top-1 in percent: a linear probe trained on `shots` random examples per class, evaluated on
    the whole test set; the mean (and standard deviation) over `draws` random draws (draw i uses seed + i)."""
    train_x, train_y = _as_tensor(train_features).numpy(), _as_tensor(train_labels).numpy()
    classes = np.unique(train_y)
    scores = []
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        picked = []
        for c in classes:
            members = np.flatnonzero(train_y == c)
            if len(members) < shots:
                raise ValueError(f"class {c} has {len(members)} training examples, fewer than shots={shots}")
            picked.append(rng.choice(members, shots, replace=False))
        picked = np.concatenate(picked)
        scores.append(linear_top1(train_x[picked], train_y[picked], test_features, test_labels, C=C,
                                  max_iter=max_iter, seed=seed + draw))
    mean, std = float(np.mean(scores)), float(np.std(scores))
    return (mean, std) if return_std else mean


def evaluate_features(train_features, train_labels, test_features, test_labels, k: int = KNN_K, shots: int = 5,
                      draws: int = 10, seed: int = 0) -> Dict[str, float]:
    """All three numbers, in percent: {'knn_top1', 'linear_top1', 'few_shot_top1', 'few_shot_std'}."""
    few, few_std = few_shot_top1(train_features, train_labels, test_features, test_labels, shots=shots, draws=draws,
                                 seed=seed, return_std=True)
    return {"knn_top1": knn_top1(train_features, train_labels, test_features, test_labels, k=k),
            "linear_top1": linear_top1(train_features, train_labels, test_features, test_labels, seed=seed),
            "few_shot_top1": few, "few_shot_std": few_std}


# ----------------------------------------------------------------------------------------------- datasets
def eval_datasets(model: torch.nn.Module, data: str, train_dir: Optional[str] = None,
                  val_dir: Optional[str] = None) -> Tuple[Dataset, Dataset]:
    """(train, evaluation) datasets preprocessed for `model`: "digits" (1,297 / 500 held-out) or an image folder
    holding train/ and val/ (or explicit --train-dir / --val-dir)."""
    config = model_data_config(model)
    size, mean, std = int(config["input_size"][-1]), tuple(config["mean"]), tuple(config["std"])
    if data == "digits":
        return (DigitsDataset("train", img_size=size, mean=mean, std=std),
                DigitsDataset("heldout", img_size=size, mean=mean, std=std))
    root = Path(data).expanduser() if data else None
    train_path = Path(train_dir) if train_dir else (root / "train" if root else None)
    val_path = Path(val_dir) if val_dir else (root / "val" if root else None)
    for what, path in (("training", train_path), ("evaluation", val_path)):
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"{what} folder {path} not found: pass --data digits, a folder holding train/ "
                                    f"and val/ class folders, or --train-dir and --val-dir")
    tf = eval_transform(tuple(config["input_size"][1:]), mean, std, config["interpolation"], config["crop_pct"],
                        config.get("crop_mode") or "center")
    train, val = ImageFolderDataset(train_path, tf), ImageFolderDataset(val_path, tf)
    if train.classes != val.classes:
        raise ValueError(f"the class folders of {train_path} and {val_path} differ: "
                         f"{sorted(set(train.classes) ^ set(val.classes))[:10]}")
    return train, val


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Evaluate frozen pooled features of an encoder: k-NN or linear-probe top-1."
    parser.add_argument("protocol", choices=("knn", "linear", "fewshot"), help="classifier on frozen features")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, checkpoint file, exported folder, zoo model name (e.g. flexpredict_vit_b16), "
                             "hf-hub:ORG/NAME or local-dir:DIR")
    parser.add_argument("--data", default="digits", help="'digits' (built in) or a folder holding train/ and val/")
    parser.add_argument("--train-dir", help="training images (class folders), instead of DATA/train")
    parser.add_argument("--val-dir", help="evaluation images (class folders), instead of DATA/val")
    parser.add_argument("--layers", choices=LAYERS, default="last", help="pooled last layer, or last 4 concatenated")
    parser.add_argument("--encoder", choices=("target", "context"), default=None,
                        help="for checkpoints holding both: the EMA target encoder (default, as the paper) or the "
                             "context one")
    parser.add_argument("--k", type=int, default=KNN_K, help="neighbours for k-NN")
    parser.add_argument("--shots", type=int, default=5, help="examples per class for fewshot")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for image folders")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def run(args: argparse.Namespace) -> int:
    from flexpredict_zoo.encoders import load_encoder
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = load_encoder(args.checkpoint, args.encoder)
    train_set, val_set = eval_datasets(model, args.data, args.train_dir, args.val_dir)
    train_x, train_y = extract(model, train_set, args.layers, device, args.batch_size, args.workers)
    val_x, val_y = extract(model, val_set, args.layers, device, args.batch_size, args.workers)
    if args.protocol == "knn":
        what, top1 = f"k-NN (k={args.k}, cosine, weighted)", knn_top1(train_x, train_y, val_x, val_y, k=args.k)
    elif args.protocol == "linear":
        what, top1 = "linear probe (logistic regression)", linear_top1(train_x, train_y, val_x, val_y)
    else:
        what, top1 = f"{args.shots}-shot linear (10 draws)", few_shot_top1(train_x, train_y, val_x, val_y,
                                                                            shots=args.shots)
    print(f"{what} top-1: {top1:.2f}%   [{args.checkpoint}, layers={args.layers}, features {train_x.shape[1]}, "
          f"{len(train_y)} train / {len(val_y)} eval images, {time.perf_counter() - start:.1f} s]")
    return 0
