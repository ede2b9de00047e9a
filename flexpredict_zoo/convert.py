"""Convert an official StoP training checkpoint (or an exported state dict) into a timm model folder.

The folder holds `model.safetensors` (the timm state dict of the chosen encoder) and `config.json` in timm's
Hub format, so `timm.create_model("local-dir:DIR")` and, once uploaded, `timm.create_model("hf-hub:ORG/NAME")`
load it, as does `pretrained_cfg_overlay=dict(file=DIR)`.

Two formats. The default (plugin) folder names the FlexPredict architecture: loading it needs `flexpredict_zoo`
imported, and the model regenerates its sin-cos position embedding exactly at any input size. A timm-native
folder (`timm_native=True`) names timm's own ViT (`vit_base_patch16_224` and friends) with the model_args that
reproduce FlexPredict (no class token, mean pooling after the final norm) and stores the sin-cos embedding as
the learned `pos_embed` weights: stock timm loads it without the plugin, with outputs equal to the plugin's at
the native size; at other sizes timm interpolates the stored embedding instead (see README, "Which folder").
Same input, same bytes: both formats are byte-reproducible, so their sha256 can be pinned.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from . import manifest
from .atomic_write import write_folder_atomically
from .checkpoints import (SAFETENSORS_NAME, CheckpointError, check_fits, encoder_state_dict, load_file,
                          resolve_weight_file, save_safetensors, sha256_file)
from .encoders import CONFIG_NAME, build_encoder, encoder_key
from .locks import claim_output

PathLike = Union[str, Path]
# Where the weights came from is not part of an export's config: timm must load the folder's own files.
_SOURCE_CFG_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "custom_load", "source", "state_dict", "tag",
                    "architecture")
# timm's own ViT names for the FlexPredict shapes (embed_dim, depth, num_heads). The name only picks the entry
# point: the model_args of a timm-native folder carry the whole architecture (patch 16 for ViT-H, the 32px
# micro model), so shapes timm does not register fall back to vit_base_patch16_224 with their own arguments.
TIMM_VIT_NAMES = {(192, 12, 3): "vit_tiny_patch16_224", (384, 12, 6): "vit_small_patch16_224",
                  (768, 12, 12): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
                  (1280, 32, 16): "vit_huge_patch14_224"}
# What makes timm's VisionTransformer compute FlexPredict: no class token, mean over the final-normed tokens; the
# position embedding stays timm's default learned parameter, which holds the exact sin-cos values.
TIMM_NATIVE_ARGS = dict(class_token=False, global_pool="avg", fc_norm=False)
MODEL_FOLDER_JOB = "conversion, export or upload"  # one lock for the three: its holder's command says which


def folder_lock(out_dir: PathLike) -> contextlib.AbstractContextManager:
    """The lock of a model folder (`.DIR.lock` beside it, locks.claim_output, which also removes what a killed
    writer of this folder left beside it), held by every process that writes into it (convert, export, push)
    from reading its input to its last file, so a second one fails at once, naming the first. Existing files
    are refused by `write_model_folder`, under the same lock (shared within a process)."""
    return claim_output(Path(out_dir).expanduser(), MODEL_FOLDER_JOB, names=())


def timm_native_architecture(model_name: str, model_args: Optional[Mapping[str, Any]] = None
                             ) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, model_args) of timm's own ViT that computes the FlexPredict model `model_name` built with
    `model_args`, once its `pos_embed` holds the sin-cos values."""
    args = dict(manifest.model_entry(model_name)["architecture"], **dict(model_args or {}), **TIMM_NATIVE_ARGS)
    key = (args["embed_dim"], args["depth"], args["num_heads"])
    return TIMM_VIT_NAMES.get(key, "vit_base_patch16_224"), args


def flexpredict_architecture(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(FlexPredict model name, its create_model kwargs) that a folder's config.json describes, in either format."""
    plugin = config.get("flexpredict")
    if plugin:
        return plugin["architecture"], dict(plugin.get("model_args") or {})
    return config["architecture"], dict(config.get("model_args") or {})


def _timm_native(model: torch.nn.Module, model_name: str, model_args: Optional[Mapping[str, Any]],
                 tensors: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, Any], Dict[str, torch.Tensor]]:
    """(timm name, timm model_args, state dict) of the timm-native form of `model`; the state dict is checked
    against timm's model built on the meta device, so a folder stock timm cannot load is never written."""
    import timm

    name, args = timm_native_architecture(model_name, model_args)
    tensors = dict(tensors, pos_embed=model.pos_embed.detach().clone().contiguous())  # the exact sin-cos values
    with torch.device("meta"):
        native = timm.create_model(name, pretrained=False, **args)
    check_fits(tensors, native.state_dict(), what=f"timm's {name} ({args})")
    return name, args, tensors


@dataclass(frozen=True)
class InferredArchitecture:
    """What the encoder weights' shapes say about the architecture (heads are not visible in shapes)."""
    embed_dim: int
    depth: int
    patch_size: int
    mlp_ratio: float
    img_size: Optional[int]  # from the official position embedding; exported files do not store it

    def describe(self) -> str:
        size = f", img_size {self.img_size}" if self.img_size else ""
        return f"embed_dim {self.embed_dim}, depth {self.depth}, patch {self.patch_size}, mlp_ratio {self.mlp_ratio:g}{size}"


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> InferredArchitecture:
    """Read embed_dim, depth, patch size, MLP ratio (and the training image size) off the encoder's tensors."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise CheckpointError(f"no ViT encoder found: 'patch_embed.proj.weight' is missing; the weights hold "
                              f"{sorted(state_dict)[:8]}")
    embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[-1])
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 0.0
    img_size = None
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.ndim == 3:
        grid = math.isqrt(int(pos_embed.shape[1]))
        if grid * grid == pos_embed.shape[1]:
            img_size = grid * patch_size
    return InferredArchitecture(embed_dim, depth, patch_size, mlp_ratio, img_size)


def match_model_name(arch: InferredArchitecture) -> str:
    """The manifest model whose architecture has these shapes; CheckpointError naming what was found otherwise."""
    found = []
    for name in manifest.model_names():
        spec = manifest.model_entry(name)["architecture"]
        if (spec["embed_dim"], spec["depth"], spec["patch_size"], float(spec["mlp_ratio"])) != \
                (arch.embed_dim, arch.depth, arch.patch_size, arch.mlp_ratio):
            continue
        if arch.img_size is not None and spec["img_size"] != arch.img_size:
            continue
        found.append(name)
    if not found:
        known = "; ".join(f"{n} ({a['embed_dim']}/{a['depth']}/p{a['patch_size']}/{a['img_size']}px)"
                          for n in manifest.model_names() for a in [manifest.model_entry(n)["architecture"]])
        raise CheckpointError(f"no FlexPredict model has the architecture of these weights ({arch.describe()}). "
                              f"Known (embed/depth/patch/size): {known}. Pass --model NAME to choose one explicitly.")
    return found[0]


def export_config(model: torch.nn.Module, model_name: str, encoder: str,
                  model_args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """config.json in timm's Hub format: the pretrained cfg of the manifest tag for this encoder (sources removed),
    the timm.create_model kwargs that rebuild the architecture (`model_args`, read by `local-dir:`/`hf-hub:`
    loading), and which encoder of the training checkpoint the weights are (`encoder`, a key of its own)."""
    key = encoder_key(encoder)
    tags = [e for e in manifest.weight_entries(model_name) if e.encoder == key]
    cfg = dict(model.pretrained_cfg)
    if tags:
        from timm.models import get_pretrained_cfg
        tagged = get_pretrained_cfg(f"{model_name}.{tags[0].tag}")
        cfg = tagged.to_dict() if tagged is not None else cfg
    pretrained_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                      if k not in _SOURCE_CFG_KEYS and v is not None}
    pretrained_cfg["num_classes"] = 0
    config = {"architecture": model_name, "encoder": key, "num_classes": 0, "num_features": int(model.num_features),
              "global_pool": "avg", "pretrained_cfg": pretrained_cfg}
    if model_args:
        config["model_args"] = dict(model_args)
    return config


def write_model_folder(out_dir: PathLike, model: torch.nn.Module, model_name: str, encoder: str,
                       metadata: Optional[Mapping[str, str]] = None, model_args: Optional[Mapping[str, Any]] = None,
                       extra_files: Optional[Mapping[str, Callable[[Path], None]]] = None,
                       overwrite: bool = False, timm_native: bool = False) -> Path:
    """The one writer of a model folder: `model.safetensors` (the model's state dict; safetensors metadata
    `format`, `architecture`, `encoder`, `model_args` plus `metadata`, keys sorted) and `config.json`
    (`export_config`), then `extra_files[name](path)` in order (they may read the weights already written beside
    them). All files appear together or not at all, and the same input gives the same bytes. The check for
    existing files and the writing happen under the folder's lock (`folder_lock`); callers that read a long input
    first take the lock before reading it (the lock is shared within a process). Returns the folder.

    `timm_native`: write timm's own ViT instead (`timm_native_architecture`: its name and model_args in
    config.json, `pos_embed` stored with the exact sin-cos values), loadable by stock timm without this package;
    config.json keeps the FlexPredict model under `flexpredict` and the metadata under `flexpredict_*`."""
    key = encoder_key(encoder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = export_config(model, model_name, key, model_args)
    header = {"format": "pt", "architecture": model_name, "encoder": key, **dict(metadata or {})}
    if model_args:
        header["model_args"] = json.dumps(dict(model_args))
    if timm_native:
        timm_name, native_args, tensors = _timm_native(model, model_name, model_args, tensors)
        plugin = {"architecture": model_name, "model_args": dict(model_args or {})}
        config = {**config, "architecture": timm_name, "model_args": native_args, "flexpredict": plugin}
        header.update(architecture=timm_name, model_args=json.dumps(native_args), flexpredict_architecture=model_name,
                      flexpredict_model_args=json.dumps(plugin["model_args"]))
    out_dir = Path(out_dir).expanduser()
    files = {
        SAFETENSORS_NAME: lambda p: save_safetensors(tensors, p, header),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        **dict(extra_files or {}),
    }
    with claim_output(out_dir, MODEL_FOLDER_JOB, overwrite, names=files):
        write_folder_atomically(out_dir, files)
    return out_dir


def convert_checkpoint(checkpoint: Union[PathLike, Mapping[str, Any]], out_dir: PathLike,
                       model_name: Optional[str] = None, encoder: str = "target", overwrite: bool = False,
                       timm_native: bool = False) -> Path:
    """Write `model.safetensors` and `config.json` for one encoder of `checkpoint` into `out_dir`; return out_dir.

    `checkpoint` is an official StoP training checkpoint, an exported safetensors file or converted folder, or
    an in-memory state dict. The architecture is inferred from the tensor shapes unless `model_name` is given;
    the weights are validated by loading them into the timm model through `checkpoint_filter_fn`. `timm_native`:
    the folder stock timm loads without this package (see `write_model_folder`). A second process converting
    into the same folder meanwhile gets OutputInUseError naming this one.
    """
    key = encoder_key(encoder)
    with folder_lock(out_dir):
        if isinstance(checkpoint, Mapping):
            raw, source_name, source_sha = checkpoint, "<state dict>", ""
        else:
            path = resolve_weight_file(checkpoint)
            raw, source_name, source_sha = load_file(path), path.name, sha256_file(path)
        state_dict = encoder_state_dict(raw, key)
        if model_name is None:
            model_name = match_model_name(infer_architecture(state_dict))
        manifest.model_entry(model_name)  # an unknown name fails here, with close matches
        model = build_encoder(model_name, {}, state_dict, source=None if isinstance(checkpoint, Mapping) else path)
        return write_model_folder(out_dir, model, model_name, key,
                                  metadata={"source_file": source_name, "source_sha256": source_sha},
                                  overwrite=overwrite, timm_native=timm_native)


def timm_native_copy(folder: PathLike, out_dir: PathLike, overwrite: bool = False) -> Path:
    """The timm-native form of a plugin folder written by `convert` or `export` into `out_dir`: the same weights,
    encoder, architecture (its model_args included) and source record. Returns out_dir."""
    from .encoders import resolve_encoder

    config, metadata = read_export(folder)
    loaded = resolve_encoder(Path(folder).expanduser())
    written_here = ("format", "architecture", "encoder", "model_args", "flexpredict_architecture",
                    "flexpredict_model_args")
    source = {k: v for k, v in sorted(metadata.items()) if k not in written_here}
    return write_model_folder(out_dir, loaded.model, loaded.architecture,
                              config.get("encoder") or metadata.get("encoder") or "target_encoder", metadata=source,
                              model_args=loaded.model_kwargs, overwrite=overwrite, timm_native=True)


def read_export(folder: PathLike) -> tuple:
    """(config dict, safetensors metadata dict) of a folder written by `convert_checkpoint`."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    weights, config = folder / SAFETENSORS_NAME, folder / CONFIG_NAME
    for needed in (weights, config):
        if not needed.is_file():
            raise CheckpointError(f"{folder} is not a converted model folder: {needed.name} is missing "
                                  f"(write one with `flexpredict-zoo convert CHECKPOINT --out {folder}`)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); convert the checkpoint again") from e
    try:
        return json.loads(config.read_text()), metadata
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e}); convert the checkpoint again") from e
