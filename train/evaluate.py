"""Frozen-feature evaluation of an encoder: k-NN, linear probe and few-shot top-1; `flexpredict-train eval`.

Features come from the zoo's one extractor (`flexpredict_zoo.features`): the encoder's mean-pooled tokens after
the final LayerNorm, of the last layer (`layers="last"`), or of each of the last 4 layers concatenated
(`layers="last4"`, the paper's second linear-probe number; each layer goes through the final norm, as DINOv2's
`get_intermediate_layers(norm=True)`). `flexpredict-train eval` writes them once into a feature store
(`extract_to_store`) and reads them from there in batches, so a second evaluation of the same weights extracts
nothing and no data set is too large for memory.

    feats_train, y_train = extract(model, DigitsDataset("train"))        # in memory, for small sets
    feats_test, y_test = extract(model, DigitsDataset("heldout"))
    knn_top1(feats_train, y_train, feats_test, y_test)                    # percent
    fit_linear_probe(TensorBatches(feats_train, y_train), TensorBatches(feats_test, y_test)).top1

The linear probe of `eval linear` is the torch sweep of `linear_probe.py` (any size, GPU when there is one).
scikit-learn's logistic regression (`linear_top1`) stays where it is the better tool: few-shot probes on a
handful of examples and the demo's small tables, where an exact solver needs no hyperparameter search.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from flexpredict_zoo.features import (encode_batch, eval_transform, extract_features, model_data_config,
                                      normalise_layers)

from .data import DigitsDataset, ImageFolderDataset
from .linear_probe import (EPOCHS, LEARNING_RATES, MIN_STEPS, VAL_FRACTION, WEIGHT_DECAYS, as_batches, as_tensor,
                           fit_linear_probe)
from .linear_probe import BATCH_SIZE as PROBE_BATCH_SIZE

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
def knn_top1(train_features, train_labels, test_features, test_labels, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE, chunk: int = 1024, batch_size: int = 16384,
             device: Union[str, torch.device, None] = None) -> float:
    """Weighted k-NN top-1 in percent, as DINO's evaluation: cosine similarity, the k nearest training
    features vote for their label with weight exp(similarity / temperature).

    `train_features`: a matrix (with `train_labels`) or a `FeatureBatches` source such as a feature store
    (`train_labels` None); it is read once, `batch_size` rows at a time, and each chunk of `chunk` test rows
    keeps its k best neighbours across the training batches, so neither side is ever compared whole."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = as_batches(train_features, train_labels)
    test = torch.nn.functional.normalize(as_tensor(test_features).float().to(device), dim=1)
    test_y = as_tensor(test_labels).long().to(device)
    best_sims = torch.full((len(test), k), -math.inf, device=device)
    best_labels = torch.zeros((len(test), k), dtype=torch.long, device=device)
    num_classes = int(test_y.max()) + 1 if len(test_y) else 1
    for x, y in train.iter_batches(batch_size):
        x = torch.nn.functional.normalize(x.float().to(device), dim=1)
        y = y.long().to(device)
        num_classes = max(num_classes, int(y.max()) + 1)
        for start in range(0, len(test), chunk):
            rows = slice(start, start + chunk)
            sims = torch.cat([best_sims[rows], test[rows] @ x.T], 1)
            labels = torch.cat([best_labels[rows], y.expand(len(sims), -1)], 1)
            best_sims[rows], picked = sims.topk(k, dim=1)
            best_labels[rows] = labels.gather(1, picked)
    # fewer than k training rows: the empty places hold similarity -inf, weight exp(-inf) = 0
    votes = torch.zeros(len(test), num_classes, device=device).scatter_add_(
        1, best_labels, (best_sims / temperature).exp())
    return 100.0 * int((votes.argmax(1) == test_y).sum()) / len(test)


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
    clf = _fit_linear(as_tensor(train_features).numpy(), as_tensor(train_labels).numpy(), C, max_iter, seed)
    pred = clf.predict(np.asarray(as_tensor(test_features).numpy(), dtype=np.float64))
    return 100.0 * float((pred == as_tensor(test_labels).numpy()).mean())


def few_shot_top1(train_features, train_labels, test_features, test_labels, shots: int = 5, draws: int = 10,
                  seed: int = 0, C: float = LINEAR_C, max_iter: int = LINEAR_MAX_ITER,
                  return_std: bool = False) -> Union[float, Tuple[float, float]]:
    """Few-shot top-1 in percent: a linear probe trained on `shots` random examples per class, evaluated on
    the whole test set; the mean (and standard deviation) over `draws` random draws (draw i uses seed + i)."""
    train_x, train_y = as_tensor(train_features).numpy(), as_tensor(train_labels).numpy()
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


# ----------------------------------------------------------------------------------------------- feature stores
FEATURES_CACHE_ENV = "FLEXPREDICT_FEATURES_CACHE"
STORE_WAIT_S = 5.0  # how often an evaluation checks whether another one still fills the same feature cache


class StoreBatches:
    """The rows of a feature store (`flexpredict_zoo.features.open_features`) as `FeatureBatches`: (features,
    labels) with the features of `layers` ("last": the pooled output; "last4": the four blocks concatenated in
    block order, as `extract`), read from the memory-mapped shards a batch at a time."""

    def __init__(self, store, layers: str = "last"):
        if store.labels is None:
            raise ValueError(f"the feature store {store.path} has no labels: evaluation needs a store extracted "
                             f"from a labelled dataset")
        if layer_indices(layers) is None:
            self.keys = ["pooled"]
        else:
            if not store.layers or len(store.layers) < 4:
                raise ValueError(f"the feature store {store.path} holds layers {store.layers or []}, not the last "
                                 f"4 blocks that --layers last4 needs: extract it with those layers")
            self.keys = [f"layer_{i}" for i in store.layers[-4:]]
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        for batch in self.store.iter_batches(batch_size, keys=[*self.keys, "labels"], shuffle=shuffle, seed=seed):
            yield torch.cat([batch[key] for key in self.keys], 1), batch["labels"]

    def load(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All rows in memory, for the classifiers that need them whole (few-shot, k-NN's test side)."""
        features, labels, filled = None, torch.empty(len(self), dtype=torch.long), 0
        for x, y in self.iter_batches(65536):
            if features is None:
                features = torch.empty(len(self), x.shape[1], dtype=torch.float32)
            features[filled:filled + len(x)], labels[filled:filled + len(x)] = x, y
            filled += len(x)
        return features, labels


def default_features_dir(checkpoint: str, data: str, train_dir: Optional[str], val_dir: Optional[str],
                         layers: str, weights_sha256: str) -> Path:
    """The cache folder of one evaluation's features: $FLEXPREDICT_FEATURES_CACHE (default
    ~/.cache/flexpredict_zoo/features), then a folder named for the checkpoint, data and layers, with a digest
    of the weights and data paths, so that other weights or other images never share a folder."""
    root = Path(os.environ.get(FEATURES_CACHE_ENV) or Path.home() / ".cache" / "flexpredict_zoo" / "features")
    sources = [data if data == "digits" else str(Path(data).expanduser().resolve())]
    sources += [str(Path(d).expanduser().resolve()) if d else "" for d in (train_dir, val_dir)]
    digest = hashlib.sha256(json.dumps([weights_sha256, sources, layers]).encode()).hexdigest()[:16]
    readable = "-".join(Path(p).name or p for p in (str(checkpoint).rstrip("/"), data.rstrip("/")))
    return root / f"{''.join(c if c.isalnum() or c in '._-' else '_' for c in readable)}-{layers}-{digest}"


def stored_features(model: torch.nn.Module, train_set: Dataset, val_set: Dataset, layers: str, features_dir: Path,
                    device: Union[str, torch.device], batch_size: int = 256, num_workers: int = 0,
                    report=print) -> Tuple[StoreBatches, StoreBatches]:
    """(train, evaluation) features as stores under `features_dir`/train and /val: extracted once, continued
    if an extraction was stopped, reused as they are by every later evaluation of the same weights and data."""
    from flexpredict_zoo.feature_store import StoreInUseError
    from flexpredict_zoo.features import extract_to_store
    blocks = normalise_layers(layer_indices(layers), model)
    stores = []
    for split, dataset in (("train", train_set), ("val", val_set)):
        waiting = False
        while True:
            try:
                store = extract_to_store(model, dataset, features_dir / split, layers=blocks, batch_size=batch_size,
                                         device=device, num_workers=num_workers, fingerprint={"split": split},
                                         report=report)
                break
            except StoreInUseError as error:
                # another evaluation of the same weights and data (k-NN and linear started together) is filling
                # this cache: wait for it and reuse its features rather than fail (a dead one releases the lock)
                if not waiting:
                    report(f"waiting for the features: {error}")
                    waiting = True
                time.sleep(STORE_WAIT_S)
        stores.append(StoreBatches(store, layers))
    return stores[0], stores[1]


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Evaluate frozen pooled features of an encoder: k-NN, linear-probe or few-shot top-1. "
                          "Features are extracted once into a feature store and reused by later evaluations.")
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
    parser.add_argument("--features-dir", default=None,
                        help=f"feature store folder (train/ and val/ inside), made or reused; default: a folder per "
                             f"weights, data and layers under ${FEATURES_CACHE_ENV} or ~/.cache/flexpredict_zoo/features")
    parser.add_argument("--k", type=int, default=KNN_K, help="neighbours for k-NN")
    parser.add_argument("--shots", type=int, default=5, help="examples per class for fewshot")
    probe = parser.add_argument_group("linear probe (torch; hyperparameters chosen on a held-out part of the training set)")
    probe.add_argument("--lrs", type=float, nargs="+", default=list(LEARNING_RATES), help="learning rates swept")
    probe.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), help="weight decays swept")
    probe.add_argument("--epochs", type=int, default=EPOCHS, help=f"passes over the features (at least {MIN_STEPS} "
                                                                  f"steps on small data sets: --min-steps)")
    probe.add_argument("--min-steps", type=int, default=MIN_STEPS)
    probe.add_argument("--probe-batch-size", type=int, default=PROBE_BATCH_SIZE)
    probe.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                       help="part of the TRAINING set held out to choose the hyperparameters")
    probe.add_argument("--select", choices=("loss", "accuracy"), default="loss",
                       help="choose the setting of lowest held-out cross-entropy (default) or best held-out top-1")
    probe.add_argument("--no-refit", action="store_true",
                       help="keep the head trained on the rest of the training set instead of retraining the chosen "
                            "setting on all of it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch for the feature extraction")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for image folders")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def evaluate_checkpoint(args: argparse.Namespace) -> Dict[str, object]:
    """The evaluation `args` describe, as a dict: protocol, top1 (percent) and what it was computed on; for the
    linear probe also the chosen lr / weight_decay, their val_top1 on the held-out part of the training set, and
    the whole sweep."""
    from flexpredict_zoo.encoders import load_encoder
    from flexpredict_zoo.feature_store import state_dict_sha256
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_encoder(args.checkpoint, args.encoder)
    train_set, val_set = eval_datasets(model, args.data, args.train_dir, args.val_dir)
    features_dir = Path(args.features_dir).expanduser() if args.features_dir else default_features_dir(
        args.checkpoint, args.data, args.train_dir, args.val_dir, args.layers, state_dict_sha256(model))
    train, val = stored_features(model, train_set, val_set, args.layers, features_dir, device, args.batch_size,
                                 args.workers)
    result: Dict[str, object] = {"protocol": args.protocol, "checkpoint": str(args.checkpoint), "layers": args.layers,
                                 "features_dir": str(features_dir), "train_images": len(train),
                                 "eval_images": len(val)}
    if args.protocol == "linear":
        probe = fit_linear_probe(train, val, lrs=args.lrs, weight_decays=args.weight_decays, epochs=args.epochs,
                                 min_steps=args.min_steps, batch_size=args.probe_batch_size,
                                 val_fraction=args.val_fraction, refit=not args.no_refit, select=args.select,
                                 seed=args.seed,
                                 device=device)
        result.update(probe.to_dict())
        return result
    val_x, val_y = val.load()
    if args.protocol == "knn":
        result.update(top1=knn_top1(train, None, val_x, val_y, k=args.k, device=device), k=args.k)
    else:
        train_x, train_y = train.load()
        result.update(top1=few_shot_top1(train_x, train_y, val_x, val_y, shots=args.shots, seed=args.seed),
                      shots=args.shots)
    result["dim"] = int(val_x.shape[1])
    return result


def describe(result: Dict[str, object]) -> str:
    """The one line `flexpredict-train eval` prints."""
    if result["protocol"] == "linear":
        what = (f"linear probe (torch, {len(result['sweep'])} settings; chosen on {result['val_rows']} held-out "
                f"training images by {result['select']}: lr {result['lr']:g}, weight decay {result['weight_decay']:g}, "
                f"held-out top-1 {result['val_top1']:.2f}%; {result['epochs']} epochs, "
                f"{'refit on all training images' if result['refit'] else 'no refit'})")
    elif result["protocol"] == "knn":
        what = f"k-NN (k={result['k']}, cosine, weighted)"
    else:
        what = f"{result['shots']}-shot linear (10 draws)"
    return (f"{what} top-1: {result['top1']:.2f}%   [{result['checkpoint']}, layers={result['layers']}, "
            f"features {result['dim']}, {result['train_images']} train / {result['eval_images']} eval images, "
            f"{result['seconds']:.1f} s; features stored in {result['features_dir']}]")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = evaluate_checkpoint(args)
    result["seconds"] = time.perf_counter() - start
    print(describe(result))
    return 0
