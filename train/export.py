"""Load the encoder of a training run, and export it into the zoo format: `flexpredict-train export RUN_DIR --out DIR`.

DIR receives `model.safetensors` and a timm `config.json` (the format `flexpredict-zoo convert` writes) plus
`manifest_entry.json`, a ready-made `weights_manifest.json` entry (source, sha256, training record, evaluation).
The export loads with

    timm.create_model(MODEL_NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import SAFETENSORS_NAME, CheckpointError, load_file, sha256_file
from flexpredict_zoo.atomic_write import write_folder_atomically
from flexpredict_zoo.convert import CONFIG_NAME, encoder_key, export_config

PathLike = Union[str, Path]
LATEST = Path("checkpoints") / "latest.pt"
ENTRY_NAME = "manifest_entry.json"
# timm.create_model kwargs that only matter while training; they are not part of an exported architecture.
_TRAINING_ONLY_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")


# ----------------------------------------------------------------------------------------------- loading
def find_run_checkpoint(path: PathLike) -> Path:
    """A run folder -> RUN_DIR/checkpoints/latest.pt; a checkpoint file -> itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        latest = path / LATEST
        if not latest.is_file():
            raise CheckpointError(f"{path} is not a training run folder: {LATEST} is missing. Pass a run folder "
                                  f"written by `flexpredict-train --config ...` or one of its checkpoint files")
        return latest
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a run folder or a checkpoint file")
    return path


def read_run_checkpoint(path: PathLike) -> Tuple[Path, Dict[str, Any]]:
    """(checkpoint file, its dict), read safely (weights_only); raise if it is not a flexpredict-train checkpoint."""
    ckpt_path = find_run_checkpoint(path)
    ckpt = load_file(ckpt_path)
    missing = [k for k in ("model_name", "target_encoder", "encoder") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt_path} is not a flexpredict-train checkpoint (it lacks {missing}). For an "
                              f"official StoP checkpoint use `flexpredict-zoo convert`")
    return ckpt_path, ckpt


def architecture_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The timm.create_model kwargs that define the architecture (training-only ones such as drop_path_rate removed)."""
    return {k: v for k, v in dict(model_kwargs or {}).items() if k not in _TRAINING_ONLY_KWARGS}


def build_encoder(model_name: str, model_kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]):
    """The zoo model with these weights, through checkpoint_filter_fn (which raises on any mismatch), in eval mode."""
    import timm
    from flexpredict_zoo.vision_transformer import checkpoint_filter_fn
    model = timm.create_model(model_name, pretrained=False, **architecture_kwargs(model_kwargs))
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model.eval()


def load_run_encoder(path: PathLike, encoder: str = "target"):
    """The encoder of a training run (run folder or checkpoint file; "target" = EMA target encoder, "context"),
    or of an exported/converted folder or its model.safetensors, as an eval-mode timm model."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or (path.is_dir() and (path / SAFETENSORS_NAME).is_file()):
        return load_exported_encoder(path)
    _, ckpt = read_run_checkpoint(path)
    return build_encoder(ckpt["model_name"], ckpt.get("model_kwargs") or {}, ckpt[encoder_key(encoder)])


def load_exported_encoder(path: PathLike):
    """A folder written by `export`/`flexpredict-zoo convert` (or its model.safetensors beside config.json)."""
    import timm
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: the model name of {path} is unknown. Load it with "
                              f"timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...))")
    config = json.loads(config_path.read_text())
    weights = path if path.is_file() else folder / SAFETENSORS_NAME
    model = timm.create_model(config["architecture"], pretrained=True, **(config.get("model_args") or {}),
                              pretrained_cfg_overlay=dict(file=str(weights)))
    return model.eval()


def load_encoder(spec: str, encoder: str = "target"):
    """What `--checkpoint` names: an existing path (run folder, checkpoint, export), a zoo model name
    (e.g. flexpredict_vit_b16) or a timm `hf-hub:ORG/NAME` / `local-dir:DIR` export."""
    import timm
    import flexpredict_zoo  # noqa: F401  (registers the models)
    if spec.startswith(("hf-hub:", "local-dir:")):
        return timm.create_model(spec, pretrained=True).eval()
    if Path(spec).expanduser().exists():
        return load_run_encoder(spec, encoder)
    if "/" in spec or spec.endswith((".pt", ".pth", ".tar", ".safetensors")):
        raise CheckpointError(f"{spec} does not exist; pass a run folder, a checkpoint file or a zoo model name")
    manifest.model_entry(spec)  # an unknown name fails here with close matches
    return timm.create_model(spec, pretrained=True).eval()


# ----------------------------------------------------------------------------------------------- export
def _split_name(name: Optional[str], model_name: str, default_tag: str) -> str:
    if not name:
        tag = default_tag
    else:
        model, _, tag = name.rpartition(".")
        if model and model != model_name:
            raise ValueError(f"--name {name!r} names model {model!r}, but the run trained {model_name!r}; "
                             f"pass {model_name}.TAG or just TAG")
    if not re.fullmatch(r"[A-Za-z0-9_]+", tag or ""):
        raise ValueError(f"tag {tag!r} must be letters, digits and underscores (e.g. digits_stop)")
    return tag


def training_record(ckpt: Mapping[str, Any], recipe: Optional[str], hardware: Optional[str]) -> Dict[str, Any]:
    """How the weights were made, from what the checkpoint records."""
    config = ckpt.get("config") or {}
    loss = ckpt.get("loss")
    record = {
        "recipe": recipe,
        "dataset": (config.get("data") or {}).get("dataset"),
        "iterations": int(ckpt["iteration"]) if ckpt.get("iteration") is not None else None,
        "epochs": int(ckpt["epoch"]) if ckpt.get("epoch") is not None else None,
        "final_loss": float(loss) if loss is not None else None,
        "batch_size_per_process": (config.get("data") or {}).get("batch_size"),
        "noise_std": (config.get("predictor") or {}).get("noise_std"),
        "predictor_depth": (config.get("predictor") or {}).get("depth"),
        "seed": (config.get("run") or {}).get("seed"),
        "hardware": hardware or ckpt.get("hardware"),
    }
    for key in ("train_seconds", "world_size"):
        if ckpt.get(key) is not None:
            record[key] = ckpt[key]
    return {k: v for k, v in record.items() if v is not None}


def export_run(run: PathLike, out_dir: PathLike, encoder: str = "target", name: Optional[str] = None,
               license: str = "apache-2.0", recipe: Optional[str] = None, hardware: Optional[str] = None,
               evaluation: Optional[Mapping[str, Any]] = None, description: Optional[str] = None,
               overwrite: bool = False) -> Path:
    """Write model.safetensors, config.json and manifest_entry.json for one encoder of a run; return out_dir.
    All three files appear together or not at all (written in a temporary folder, then moved)."""
    from safetensors.torch import save_file

    ckpt_path, ckpt = read_run_checkpoint(run)
    key = encoder_key(encoder)
    model_name = ckpt["model_name"]
    model_args = architecture_kwargs(ckpt.get("model_kwargs"))
    model = build_encoder(model_name, model_args, ckpt[key])
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    tag = _split_name(name, model_name, re.sub(r"\W", "_", run_dir.resolve().name) or "custom")

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "architecture": model_name, "encoder": key, "source_file": ckpt_path.name,
                "model_args": json.dumps(model_args)}
    config = export_config(model, model_name, key)
    if model_args:  # timm's Hub config: model_args are passed to create_model by `local-dir:`/`hf-hub:` loading
        config["model_args"] = model_args

    def write_entry(path: Path) -> None:
        entry = {
            "tag": tag, "encoder": key,
            "description": description or f"{'EMA target' if key == 'target_encoder' else 'context'} encoder "
                                          f"trained by flexpredict-train ({run_dir.name})",
            "source": {"package_file": f"weights/{model_name}.{tag}.safetensors"},
            "sha256": sha256_file(path.parent / SAFETENSORS_NAME),  # written first, in the same folder
            "license": license,
            "training": training_record(ckpt, recipe, hardware),
        }
        if evaluation:
            entry["evaluation"] = dict(evaluation)
        path.write_text(json.dumps({"model": model_name, "model_args": model_args, "entry": entry}, indent=2) + "\n")

    out_dir = Path(out_dir).expanduser()
    write_folder_atomically(out_dir, {
        SAFETENSORS_NAME: lambda p: save_file(tensors, str(p), metadata=metadata),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        ENTRY_NAME: write_entry,
    }, overwrite)
    return out_dir


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Export a training run's encoder into the zoo format (safetensors + timm config.json)."
    parser.add_argument("run", help="run folder (uses checkpoints/latest.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--encoder", choices=("target", "context"), default="target",
                        help="target: the EMA target encoder, the one the paper evaluates (default)")
    parser.add_argument("--name", help="TAG or MODEL.TAG of the weights (default: the run folder's name)")
    parser.add_argument("--license", default="apache-2.0", help="license recorded in the manifest entry")
    parser.add_argument("--recipe", help="config the run used, recorded in the manifest entry "
                                         "(e.g. train/configs/digits_m4_32.yaml)")
    parser.add_argument("--hardware", help="hardware the run used, recorded in the manifest entry (e.g. '1x H100')")
    parser.add_argument("--evaluation", help="JSON file of evaluation results to record (e.g. the demo's results.json)")
    parser.add_argument("--description", help="description recorded in the manifest entry")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    return parser


def run(args: argparse.Namespace) -> int:
    evaluation = None
    if args.evaluation:
        try:
            evaluation = json.loads(Path(args.evaluation).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--evaluation {args.evaluation}: cannot read a JSON object ({e})")
    out = export_run(args.run, args.out, encoder=args.encoder, name=args.name, license=args.license,
                     recipe=args.recipe, hardware=args.hardware, evaluation=evaluation,
                     description=args.description, overwrite=args.overwrite)
    entry = json.loads((out / ENTRY_NAME).read_text())
    weights = out / SAFETENSORS_NAME
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB, sha256 {entry['entry']['sha256'][:16]}...)")
    print(f"wrote {out / CONFIG_NAME} and {out / ENTRY_NAME}")
    print(f"load it with: timm.create_model({entry['model']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(weights)!r}))")
    return 0
