"""One loader for every way a user names an encoder: `load_encoder(spec)` (extract, eval and demo all use it).

`spec` is one of
- a training run folder (its `checkpoints/latest.pt`) or a flexpredict-train checkpoint file,
- a folder written by `flexpredict-zoo convert` / `flexpredict-train export`, or its `model.safetensors`,
- an official StoP training checkpoint or any file of encoder weights (the architecture is read off the shapes),
- a model name, with an optional tag (`flexpredict_vit_b16`, `flexpredict_vit_b16.stop_in1k_context`, any timm name),
- `hf-hub:ORG/NAME` or `local-dir:DIR` (timm's own loaders of an exported folder).

A flexpredict-train checkpoint is a plain weights_only dict (`model_name`, `model_kwargs`, `encoder`,
`target_encoder`, ...), so it is read here without importing the training package.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import manifest
from .checkpoints import SAFETENSORS_NAME, CheckpointError, encoder_state_dict, load_file

PathLike = Union[str, Path]
CONFIG_NAME = "config.json"
RUN_CHECKPOINT = Path("checkpoints") / "latest.pt"
ENCODER_CHOICES = {"target": "target_encoder", "context": "encoder",
                   "target_encoder": "target_encoder", "encoder": "encoder"}
# timm.create_model kwargs that only matter while training; they are not part of an exported architecture.
TRAINING_ONLY_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".safetensors", ".ckpt")


@dataclass
class LoadedEncoder:
    """An encoder in eval mode and what rebuilds its architecture (`random_init`)."""
    model: nn.Module
    architecture: str  # timm model name
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # create_model kwargs of the architecture
    description: str = ""  # what was loaded, for tables and file metadata

    def random_init(self) -> nn.Module:
        """The same architecture with freshly initialised weights (seed torch first for a reproducible one)."""
        import timm
        return timm.create_model(self.architecture, pretrained=False, **self.model_kwargs).eval()


def encoder_key(encoder: str) -> str:
    """'target' / 'context' (or the checkpoint keys themselves) -> 'target_encoder' / 'encoder'."""
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"encoder must be 'target' (the EMA target encoder the paper evaluates) or 'context', "
                         f"got {encoder!r}")
    return ENCODER_CHOICES[encoder]


def architecture_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The timm.create_model kwargs that define the architecture (training-only ones such as drop_path_rate removed)."""
    return {k: v for k, v in dict(model_kwargs or {}).items() if k not in TRAINING_ONLY_KWARGS}


def build_encoder(model_name: str, model_kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                  source: Optional[PathLike] = None) -> nn.Module:
    """The zoo model with these weights, through checkpoint_filter_fn (which raises on any mismatch, naming the
    weight file `source`), in eval mode."""
    import timm
    from .vision_transformer import checkpoint_filter_fn
    model = timm.create_model(model_name, pretrained=False, **architecture_kwargs(model_kwargs))
    model.load_state_dict(checkpoint_filter_fn(state_dict, model, source=None if source is None else str(source)),
                          strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ run checkpoints
def find_run_checkpoint(path: PathLike) -> Path:
    """A run folder -> RUN_DIR/checkpoints/latest.pt; a checkpoint file -> itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        latest = path / RUN_CHECKPOINT
        if not latest.is_file():
            raise CheckpointError(f"{path} is not a training run folder: {RUN_CHECKPOINT} is missing. Pass a run "
                                  f"folder written by `flexpredict-train --config ...` or one of its checkpoint files")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder or a checkpoint file")
    return path


def is_run_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    return all(key in checkpoint for key in ("model_name", "target_encoder", "encoder"))


def read_run_checkpoint(path: PathLike) -> Tuple[Path, Dict[str, Any]]:
    """(checkpoint file, its dict), read safely (weights_only); raise if it is not a flexpredict-train checkpoint."""
    ckpt_path = find_run_checkpoint(path)
    ckpt = load_file(ckpt_path)
    if not is_run_checkpoint(ckpt):
        missing = [k for k in ("model_name", "target_encoder", "encoder") if k not in ckpt]
        raise CheckpointError(f"{ckpt_path} is not a flexpredict-train checkpoint (it lacks {missing}). For an "
                              f"official StoP checkpoint use `flexpredict-zoo convert`")
    return ckpt_path, ckpt


def _from_run(path: Path, ckpt: Mapping[str, Any], encoder: Optional[str]) -> LoadedEncoder:
    kwargs = architecture_kwargs(ckpt.get("model_kwargs"))
    model = build_encoder(ckpt["model_name"], kwargs, ckpt[encoder_key(encoder or "target")], source=path)
    return LoadedEncoder(model, ckpt["model_name"], kwargs, f"{ckpt['model_name']} ({path.name})")


# ------------------------------------------------------------------------------------------------ exported folders
def _from_export(path: Path, encoder: Optional[str]) -> LoadedEncoder:
    folder = path if path.is_dir() else path.parent
    config = json.loads((folder / CONFIG_NAME).read_text())
    recorded = config.get("encoder")
    if encoder is not None and recorded is not None and encoder_key(encoder) != recorded:
        raise CheckpointError(f"{folder} holds the {recorded} only (its {CONFIG_NAME} says so); export the "
                              f"{encoder_key(encoder)} of the run to another folder to use it")
    weights = path if path.is_file() else folder / SAFETENSORS_NAME
    from .convert import flexpredict_architecture  # a timm-native folder records its FlexPredict model too
    architecture, kwargs = flexpredict_architecture(config)
    model = build_encoder(architecture, kwargs, load_file(weights), source=weights)
    return LoadedEncoder(model, architecture, kwargs, f"{architecture} ({folder.name})")


def _from_weights(path: Path, raw: Mapping[str, Any], encoder: Optional[str], architecture: Optional[str],
                  model_kwargs: Mapping[str, Any]) -> LoadedEncoder:
    """Encoder weights without a record of their architecture: `architecture`, or the shapes, say which."""
    from .convert import infer_architecture, match_model_name
    state_dict = encoder_state_dict(raw, encoder_key(encoder or "target"))
    if architecture is None:
        architecture = match_model_name(infer_architecture(state_dict))
    model = build_encoder(architecture, model_kwargs, state_dict, source=path)
    return LoadedEncoder(model, architecture, architecture_kwargs(model_kwargs), f"{architecture} ({path.name})")


def _from_path(path: Path, encoder: Optional[str]) -> LoadedEncoder:
    if path.is_dir():
        if (path / RUN_CHECKPOINT).is_file():
            return _from_run(path, read_run_checkpoint(path)[1], encoder)
        if (path / SAFETENSORS_NAME).is_file() and (path / CONFIG_NAME).is_file():
            return _from_export(path, encoder)
        raise CheckpointError(f"{path} is neither a training run folder ({RUN_CHECKPOINT} is missing) nor an "
                              f"exported model folder ({SAFETENSORS_NAME} and {CONFIG_NAME} are missing); pass one "
                              f"of those, a checkpoint file or a model name")
    if path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file():
        return _from_export(path, encoder)
    raw = load_file(path)
    if is_run_checkpoint(raw):
        return _from_run(path, raw, encoder)
    try:
        return _from_weights(path, raw, encoder, None, {})
    except CheckpointError as e:
        raise CheckpointError(f"{path} is neither a flexpredict-train checkpoint nor FlexPredict encoder weights: "
                              f"{e}") from None


# ------------------------------------------------------------------------------------------------ names
def _unknown_name(name: str) -> manifest.UnknownModelError:
    import timm
    close = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return manifest.UnknownModelError(
        f"unknown model {name!r}.{hint} Pass a zoo model name (`flexpredict-zoo list` prints them; any timm model "
        f"name also works), a run folder, a checkpoint file or an exported folder.")


def _from_name(name: str, pretrained: bool, weights: Optional[PathLike], encoder: Optional[str],
               model_kwargs: Mapping[str, Any]) -> LoadedEncoder:
    import timm
    architecture = name.partition(".")[0]
    if not timm.is_model(architecture):
        raise _unknown_name(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"weight file {path} does not exist")
        return _from_weights(path, load_file(path), encoder, architecture, model_kwargs)
    if pretrained and architecture in manifest.model_names():
        try:
            entry = manifest.weight_entry(name)  # unknown tags and models without weights fail here, by name
        except KeyError as e:
            raise manifest.UnknownModelError(f"{e} Pass a run folder, a checkpoint file or an exported folder "
                                             f"instead, or use random weights (pretrained=False).") from None
        if encoder is not None and encoder_key(encoder) != entry.encoder:
            # No tag given: the first tag holding the requested encoder; a tag holding the other one is an error.
            matching = [e for e in manifest.weight_entries(architecture) if e.encoder == encoder_key(encoder)]
            if "." in name or not matching:
                raise CheckpointError(f"{entry.name} is the {entry.encoder}, not the {encoder_key(encoder)}; "
                                      f"`flexpredict-zoo info {architecture}` lists the tags and their encoders")
            name = matching[0].name
    model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    return LoadedEncoder(model.eval(), architecture, dict(model_kwargs), name)


def _from_timm_source(spec: str, model_kwargs: Mapping[str, Any]) -> LoadedEncoder:
    """`hf-hub:ORG/NAME` / `local-dir:DIR`: timm reads the folder's config.json and weights itself."""
    import timm
    model = timm.create_model(spec, pretrained=True, **model_kwargs).eval()
    if spec.startswith("local-dir:"):
        config_path = Path(spec[len("local-dir:"):]).expanduser() / CONFIG_NAME
    else:
        from .hub import download
        config_path = download(spec[len("hf-hub:"):], CONFIG_NAME)  # cached by timm's own load just now
    config = json.loads(Path(config_path).read_text())
    kwargs = dict(config.get("model_args") or {}, **model_kwargs)
    return LoadedEncoder(model, config["architecture"], kwargs, spec)


# ------------------------------------------------------------------------------------------------ entry point
def resolve_encoder(spec: PathLike, encoder: Optional[str] = None, *, pretrained: bool = True,
                    weights: Optional[PathLike] = None,
                    model_kwargs: Optional[Mapping[str, Any]] = None) -> LoadedEncoder:
    """The encoder `spec` names (see the module docstring), in eval mode, with what rebuilds its architecture.

    `encoder`: 'target' (the EMA encoder the paper evaluates; the default for checkpoints holding both) or
    'context'; an export or a released tag holds one, and asking for the other is an error. `weights`: a file
    of encoder weights for the model name `spec` (its architecture; `model_kwargs` adjust it). `pretrained=False`
    gives random weights and only applies to a model name.
    """
    kwargs = dict(model_kwargs or {})
    if encoder is not None:
        encoder_key(encoder)  # an invalid choice fails before anything is read
    text = str(spec)
    if text.startswith(("hf-hub:", "local-dir:")):
        if weights is not None or not pretrained:
            raise ValueError(f"{text} names a model with its own weights; weights= and pretrained=False do not apply")
        return _from_timm_source(text, kwargs)
    path = Path(text).expanduser()
    if path.exists():
        if weights is not None or not pretrained or kwargs:
            raise ValueError(f"{path} holds its own weights and architecture; pass a model name to use "
                             f"weights=, pretrained=False or model_kwargs")
        return _from_path(path, encoder)
    if "/" in text or "\\" in text or text.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{path} does not exist; pass a run folder, a checkpoint file, an exported folder "
                                f"or a model name")
    if not pretrained and weights is not None:
        raise ValueError("weights= and pretrained=False contradict each other; pass one of them")
    return _from_name(text, pretrained, weights, encoder, kwargs)


def load_encoder(spec: PathLike, encoder: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """`resolve_encoder(spec, encoder, **kwargs).model`: the eval-mode encoder alone."""
    return resolve_encoder(spec, encoder, **kwargs).model
