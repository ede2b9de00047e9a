"""Feature extraction over folders of images: the Python API and the body of `flexpredict-zoo extract`.

    from flexpredict_zoo.features import extract_features, save_features
    result = extract_features("flexpredict_vit_b16", "photos/", patch_tokens=True, layers=[8, 11])
    result.names, result.pooled.shape          # ['a.jpg', 'sub/b.png'], (2, 768)
    save_features(result, "photos.safetensors")

Images are preprocessed with the model's official evaluation transform (`timm.data.resolve_data_config` +
`create_transform`). An image that cannot be read is logged by name and recorded in `result.skipped` with the
reason; it is never dropped silently.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .atomic_write import write_file_atomically

__all__ = ["FeatureResult", "extract_features", "save_features", "load_features", "find_images",
           "add_extract_arguments", "run_extract", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
FORMAT_VERSION = "1"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


@dataclass
class FeatureResult:
    """Features of the images that were read, one row per name, in the order of `names`.

    pooled: (N, D) float32, the model's pooled pre-logits output (for FlexPredict: final norm, mean over tokens).
    patch_tokens: (N, L, D) float32 final-normed patch tokens (prefix tokens removed), when requested.
    intermediates: {block index: (N, D)} the mean over tokens of that block's output (before the final norm),
        for the requested `layers`; block indices are 0-based and non-negative (-1 is stored as depth-1).
    intermediate_tokens: {block index: (N, L, D)} the token maps of the same blocks, when both `layers` and
        `patch_tokens` are requested.
    skipped: (path, reason) for every image that could not be read; these have no row.
    """
    names: List[str]
    pooled: torch.Tensor
    patch_tokens: Optional[torch.Tensor] = None
    intermediates: Optional[Dict[int, torch.Tensor]] = None
    intermediate_tokens: Optional[Dict[int, torch.Tensor]] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    model_name: Optional[str] = None
    input_size: Optional[Tuple[int, int, int]] = None
    dtype: Optional[str] = None
    metadata: Dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- inputs

def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Tuple[Path, str]]:
    """(path on disk, name) for every image, in a deterministic order.

    A single folder: its image files, recursively, named relative to the folder and sorted by that name.
    A list: in the order given; a file is taken whatever its extension and named as given; a folder expands
    to its sorted image files named `folder/relative/path`. A missing path or a folder without images is an error.
    """
    single = isinstance(inputs, (str, os.PathLike))
    items = [inputs] if single else list(inputs)
    if not items:
        raise ValueError("no input paths given: pass image files or folders of images")
    found: List[Tuple[Path, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                           if p.is_file() and _is_image_file(p))
            if not files:
                raise ValueError(f"no images found in folder {str(path)!r} (searched recursively for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder that holds images")
            for relative, file in files:
                found.append((file, relative if single else (Path(item) / relative).as_posix()))
        elif path.is_file():
            found.append((path, str(item)))
        else:
            raise FileNotFoundError(f"input path {str(item)!r} does not exist; pass image files or folders of images")
    return found


def _read_image(path: Path):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert("RGB")  # convert() forces the full decode, so truncated files fail here


class _ImageDataset(torch.utils.data.Dataset):
    """Returns (index, tensor, None) or, for an unreadable image, (index, None, reason): the collate separates them."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(_read_image(self.paths[index])), None
        except Exception as error:  # any failure is recorded with its reason, never dropped silently
            return index, None, f"{type(error).__name__}: {error}"


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    failed = [(i, reason) for i, x, reason in batch if x is None]
    return indices, images, failed


# ----------------------------------------------------------------------------------------------------------- model

def _create_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm
    from . import vision_transformer  # noqa: F401  (registers the flexpredict_* names with timm)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if not str(error).startswith("Unknown model"):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `flexpredict-zoo list` prints the FlexPredict models; "
                         f"any timm model name also works.") from None


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch:
        return f"{arch}.{tag}" if tag else arch
    return type(model).__name__


def _eval_transform(model: nn.Module):
    from timm.data import create_transform, resolve_data_config
    config = resolve_data_config({}, model=model)
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        # A model built with img_size=S keeps the 224 pretrained cfg; it can only take its own size.
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return create_transform(**config), tuple(config["input_size"])


def _resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif str(dtype).lower() in _DTYPES:
        resolved = _DTYPES[str(dtype).lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    if resolved not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {resolved}; use one of bf16, fp16, fp32")
    return resolved


def _normalise_layers(layers: Optional[Sequence[int]], model: nn.Module) -> Optional[List[int]]:
    if layers is None:
        return None
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no forward_intermediates; intermediate layers need a timm model")
    if isinstance(layers, int):
        layers = [layers]
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    result = []
    for layer in layers:
        index = int(layer)
        if depth is not None:
            if not -depth <= index < depth:
                raise ValueError(f"layer {layer} is out of range: the model has {depth} blocks (0..{depth - 1}, "
                                 f"or negative from the end)")
            index %= depth
        result.append(index)
    if len(set(result)) != len(result):
        raise ValueError(f"layers {list(layers)} name the same block twice")
    return result


def _strip_prefix_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    prefix = getattr(model, "num_prefix_tokens", 0)  # class / register tokens of other timm ViTs
    return tokens[:, prefix:] if prefix else tokens


# ------------------------------------------------------------------------------------------------------ extraction

def extract_features(model: Union[str, nn.Module], inputs: Union[PathLike, Sequence[PathLike]], *,
                     batch_size: int = 64, device: Union[None, str, torch.device] = None, num_workers: int = 0,
                     patch_tokens: bool = False, layers: Optional[Sequence[int]] = None, pretrained: bool = True,
                     dtype: Union[None, str, torch.dtype] = None, progress: bool = False,
                     model_kwargs: Optional[Mapping[str, Any]] = None) -> FeatureResult:
    """Features of images (a folder, a file, or a list of both) from a timm model name or a model.

    `model`: a name (created with `timm.create_model(name, pretrained=pretrained, **model_kwargs)`) or an
    nn.Module (timm-style: forward_features / forward_head; it is moved to `device` and run in eval mode, and
    its train/eval mode is restored afterwards). `device` defaults to CUDA when available. `dtype` is the
    autocast dtype: default bf16 on CUDA and fp32 (no autocast) on CPU; outputs are always float32.
    `layers`: block indices for `result.intermediates` (see FeatureResult). Unreadable images are logged and
    listed in `result.skipped`; if none can be read, ValueError.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    autocast_dtype = _resolve_dtype(dtype, device)
    files = find_images(inputs)  # before building the model: a bad path fails fast

    if isinstance(model, str):
        name = model
        model = _create_model(model, pretrained, **dict(model_kwargs or {}))
    else:
        if model_kwargs:
            raise ValueError("model_kwargs only apply when the model is given by name")
        name = _model_name(model)
    layer_indices = _normalise_layers(layers, model)
    if (patch_tokens or layer_indices is not None) and not hasattr(model, "forward_features"):
        raise ValueError(f"{type(model).__name__} has no forward_features; patch tokens need a timm model")
    transform, input_size = _eval_transform(model)

    was_training = model.training
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        _ImageDataset([path for path, _ in files], transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    failures: Dict[int, str] = {}
    batches: List[Tuple[torch.Tensor, Dict[str, Any]]] = []
    from tqdm import tqdm
    bar = tqdm(total=len(files), unit="img", desc=f"extract {name}", file=sys.stderr, disable=not progress)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype != torch.float32):
            for indices, images, failed in loader:
                for index, reason in failed:
                    failures[index] = reason
                    message = f"skipped unreadable image {files[index][1]}: {reason}"
                    if progress:
                        bar.write(message, file=sys.stderr)
                    else:
                        logger.warning(message)
                if images is not None:
                    batches.append((indices, _forward(model, images.to(device, non_blocking=True),
                                                      patch_tokens, layer_indices)))
                bar.update(len(indices) + len(failed))
    finally:
        bar.close()
        model.train(was_training)

    skipped = [(files[i][1], failures[i]) for i in sorted(failures)]
    if not batches:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise ValueError(f"none of the {len(files)} images could be read ({reasons}"
                         f"{'; ...' if len(skipped) > 5 else ''})")
    indices = torch.cat([i for i, _ in batches])
    # Rows follow the input order whatever order the loader delivered them in.
    order = torch.argsort(indices)

    def gather(get: Callable[[Dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(out) for _, out in batches])[order]

    return FeatureResult(
        names=[files[i][1] for i in indices[order].tolist()],
        pooled=gather(lambda out: out["pooled"]),
        patch_tokens=gather(lambda out: out["tokens"]) if patch_tokens else None,
        intermediates=({layer: gather(lambda out: out["inter"][layer]) for layer in layer_indices}
                       if layer_indices is not None else None),
        intermediate_tokens=({layer: gather(lambda out: out["inter_tokens"][layer]) for layer in layer_indices}
                             if layer_indices is not None and patch_tokens else None),
        skipped=skipped, model_name=name, input_size=input_size, dtype=str(autocast_dtype).replace("torch.", ""))


def _forward(model: nn.Module, images: torch.Tensor, patch_tokens: bool,
             layers: Optional[List[int]]) -> Dict[str, Any]:
    """One forward pass; everything returned is float32 on the CPU."""
    out: Dict[str, Any] = {}
    if layers is not None:
        final, intermediates = model.forward_intermediates(images, indices=layers, output_fmt="NLC")
        out["inter"] = {i: t.float().mean(dim=1).cpu() for i, t in zip(layers, intermediates)}
        if patch_tokens:
            out["inter_tokens"] = {i: t.float().cpu() for i, t in zip(layers, intermediates)}
    elif patch_tokens:
        final = model.forward_features(images)
    else:
        final = None
    if final is None:
        pooled = model.forward_head(model.forward_features(images), pre_logits=True) \
            if hasattr(model, "forward_head") else model(images)
    else:
        pooled = model.forward_head(final, pre_logits=True)
        if patch_tokens:
            out["tokens"] = _strip_prefix_tokens(model, final).float().cpu()
    out["pooled"] = pooled.float().cpu()
    return out


# ------------------------------------------------------------------------------------------------------- file i/o

def _versions() -> Dict[str, str]:
    import timm
    from . import __version__
    return {"torch_version": torch.__version__, "timm_version": timm.__version__, "flexpredict_zoo_version": __version__}


def save_features(result: FeatureResult, path: PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `result` to a .safetensors file atomically (a temporary file in the same folder, then a rename).

    Tensors: `pooled` (N, D); `patch_tokens` (N, L, D) if present; `layer_{i}` (N, D) and `layer_{i}_tokens`
    (N, L, D) per intermediate block. Metadata (all JSON strings): `names`, `skipped` (list of {path, reason}),
    `model`, `image_size` ([C, H, W]), `dtype`, `layers`, version strings, plus `metadata` (values that are not
    strings are JSON-encoded). The parent folder is created; an existing file is replaced.
    """
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {"pooled": result.pooled}
    if result.patch_tokens is not None:
        tensors["patch_tokens"] = result.patch_tokens
    for layer, value in (result.intermediates or {}).items():
        tensors[f"layer_{layer}"] = value
    for layer, value in (result.intermediate_tokens or {}).items():
        tensors[f"layer_{layer}_tokens"] = value
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header = dict(result.metadata)
    header.update({
        "format": "flexpredict_zoo.features", "format_version": FORMAT_VERSION,
        "names": json.dumps(result.names), "skipped": json.dumps([{"path": p, "reason": r} for p, r in result.skipped]),
        "model": result.model_name or "", "image_size": json.dumps(list(result.input_size or [])),
        "dtype": result.dtype or "", "layers": json.dumps(sorted(result.intermediates or {})), **_versions()})
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return write_file_atomically(path, lambda temp: save_file(tensors, str(temp), metadata=header))


def load_features(path: PathLike) -> FeatureResult:
    """Read a file written by `save_features` back into a FeatureResult (metadata in `result.metadata`)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); write it with save_features "
                         f"or `flexpredict-zoo extract`") from None
    if meta.get("format") != "flexpredict_zoo.features" or "pooled" not in tensors:
        raise ValueError(f"{path} is a safetensors file but not a feature file written by flexpredict_zoo "
                         f"(no 'format' metadata or no 'pooled' tensor)")
    layers = json.loads(meta.get("layers", "[]"))
    return FeatureResult(
        names=json.loads(meta["names"]), pooled=tensors["pooled"], patch_tokens=tensors.get("patch_tokens"),
        intermediates={i: tensors[f"layer_{i}"] for i in layers} if layers else None,
        intermediate_tokens=({i: tensors[f"layer_{i}_tokens"] for i in layers}
                             if layers and f"layer_{layers[0]}_tokens" in tensors else None),
        skipped=[(item["path"], item["reason"]) for item in json.loads(meta.get("skipped", "[]"))],
        model_name=meta.get("model") or None,
        input_size=tuple(json.loads(meta["image_size"])) if meta.get("image_size") not in (None, "[]") else None,
        dtype=meta.get("dtype") or None, metadata=meta)


# ------------------------------------------------------------------------------------------------------------ CLI

def add_extract_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `flexpredict-zoo extract MODEL PATH... --out FILE.safetensors`."""
    parser.add_argument("model", metavar="MODEL", help="timm model name, e.g. flexpredict_vit_b16")
    parser.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="output file (parent is created)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes (default: min(8, CPU count))")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--patch-tokens", action="store_true", help="also store the (N, L, D) patch tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                        help="also store the mean-pooled output of these blocks (0-based, negative from the end)")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights (for testing a pipeline)")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="local weights (official checkpoint, safetensors or converted folder) instead of the Hub")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_extract(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    if args.checkpoint and args.no_pretrained:
        raise ValueError("--checkpoint and --no-pretrained contradict each other; pass one of them")
    model_kwargs = {}
    if args.checkpoint:
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
        model_kwargs["pretrained_cfg_overlay"] = dict(file=str(args.checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    # One folder: names relative to it, as in the API; several paths: names as given.
    inputs = args.paths[0] if len(args.paths) == 1 else args.paths
    result = extract_features(
        args.model, inputs, batch_size=args.batch_size, device=args.device, num_workers=args.workers,
        patch_tokens=args.patch_tokens, layers=args.layers, pretrained=not args.no_pretrained, dtype=args.dtype,
        progress=not args.no_progress, model_kwargs=model_kwargs)
    extra = {"weights": str(args.checkpoint) if args.checkpoint else ("none" if args.no_pretrained else "pretrained")}
    save_features(result, out, extra)
    shape = "x".join(str(s) for s in result.pooled.shape)
    print(f"read {len(result.names)} images, skipped {len(result.skipped)}; wrote {out}: pooled {shape}"
          + (f", patch_tokens {'x'.join(map(str, result.patch_tokens.shape))}" if result.patch_tokens is not None else "")
          + (f", layers {sorted(result.intermediates)}" if result.intermediates else ""))
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    return 0

