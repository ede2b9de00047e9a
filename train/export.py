"""Export a training run's encoder into the zoo format: `flexpredict-train export RUN_DIR --out DIR`.

DIR receives `model.safetensors` and a timm `config.json` (written by the zoo's one folder writer,
`flexpredict_zoo.convert.write_model_folder`, as `flexpredict-zoo convert` does) plus `manifest_entry.json`, a
ready-made `weights_manifest.json` entry (source, sha256, training record, evaluation) that `manifest.validate`
accepts and `MODEL_CARD.md` renders; with `--timm-native`, a folder that stock timm loads without this package
(`timm.create_model("local-dir:DIR", pretrained=True)`). The same run gives the same bytes. The export loads with

    timm.create_model(MODEL_NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))
    flexpredict_zoo.encoders.load_encoder("DIR")
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import SAFETENSORS_NAME, CheckpointError, sha256_file
from flexpredict_zoo.cli import TIMM_NATIVE_HELP
from flexpredict_zoo.convert import CONFIG_NAME, folder_lock, write_model_folder
from flexpredict_zoo.encoders import architecture_kwargs, build_encoder, encoder_key, read_run_checkpoint

PathLike = Union[str, Path]
ENTRY_NAME = "manifest_entry.json"
EVALUATION_COMMAND = "flexpredict-train demo --checkpoint RUN_DIR --seed SEED"


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


def training_record(ckpt: Mapping[str, Any], source: PathLike, recipe: Optional[str] = None,
                    command: Optional[str] = None, hardware: Optional[str] = None,
                    wall_time_min: Optional[float] = None) -> Dict[str, Any]:
    """The manifest `training` record (keys: manifest.TRAINING_KEYS) from what a flexpredict-train checkpoint
    holds, plus what it cannot know (recipe file, command line, hardware, wall time). Raises CheckpointError
    naming what the checkpoint lacks."""
    config, sampler = ckpt.get("config") or {}, ckpt.get("sampler") or {}
    data, predictor, run = config.get("data") or {}, config.get("predictor") or {}, config.get("run") or {}
    found = {"iteration": ckpt.get("iteration"), "epoch": ckpt.get("epoch"), "loss": ckpt.get("loss"),
             "config.data.dataset": data.get("dataset"), "config.data.batch_size": data.get("batch_size"),
             "config.run.seed": run.get("seed"), "sampler.world_size": sampler.get("world_size")}
    missing = [key for key, value in found.items() if value is None]
    if missing:
        raise CheckpointError(f"{source} does not record {missing}: it was not written by this version of "
                              f"flexpredict-train, or before its first training step")
    dataset = str(data["dataset"]) + (f" ({data['root']})" if data.get("root") else "")
    record: Dict[str, Any] = {
        "dataset": dataset, "iterations": int(ckpt["iteration"]), "epochs": int(ckpt["epoch"]),
        "batch_size": int(data["batch_size"]) * int(sampler["world_size"]), "seed": int(run["seed"]),
        "final_loss": float(ckpt["loss"]), "world_size": int(sampler["world_size"]),
        "noise_std": predictor.get("noise_std"), "predictor_depth": predictor.get("depth"),
        "recipe": recipe, "command": command, "hardware": hardware,
        "wall_time_min": float(wall_time_min) if wall_time_min is not None else None}
    record = {k: v for k, v in record.items() if v is not None}
    manifest.validate_training(str(source), record)
    return record


def evaluation_record(demo_results: Sequence[Mapping[str, Any]], shipped_seed: int) -> Dict[str, Any]:
    """The manifest `evaluation` record from `flexpredict-train demo` results.json records, one per training seed
    (each demo run on the checkpoint of that seed, with --seed SEED)."""
    if not demo_results:
        raise ValueError("no demo results given: pass the results.json of `flexpredict-train demo` for each seed")
    first = demo_results[0]
    for record in demo_results:
        if "results" not in record or "seed" not in record:
            raise ValueError(f"{sorted(record)[:8]} is not a results.json written by `flexpredict-train demo`")
        settings = [record.get(k) for k in ("dataset", "layers", "knn_k", "shots", "few_shot_draws")]
        if settings != [first.get(k) for k in ("dataset", "layers", "knn_k", "shots", "few_shot_draws")]:
            raise ValueError("the demo results were measured with different settings (dataset, layers, k, shots or "
                             "draws); measure every seed the same way")
    seeds = {str(r["seed"]): {rep: {m: float(r["results"][rep][m]) for m in manifest.EVALUATION_METRICS}
                              for rep in manifest.EVALUATION_REPRESENTATIONS} for r in demo_results}
    layers = "last-layer" if first.get("layers") == "last" else "last-4-layer"
    protocol = (f"{first['heldout_images']} held-out images of {first['dataset']}, frozen pooled {layers} features; "
                f"k-NN k={first['knn_k']} cosine, linear = logistic regression on the {first['train_images']} "
                f"training images, {first['shots']}-shot = mean of {first['few_shot_draws']} draws; random init and "
                f"few-shot draws use the same seed as the run")
    record = {"protocol": protocol, "command": EVALUATION_COMMAND, "shipped_seed": int(shipped_seed), "seeds": seeds}
    manifest.validate_evaluation("demo results", record)
    return record


def export_run(run: PathLike, out_dir: PathLike, encoder: str = "target", name: Optional[str] = None,
               license: str = "apache-2.0", recipe: Optional[str] = None, hardware: Optional[str] = None,
               evaluation: Optional[Mapping[str, Any]] = None, description: Optional[str] = None,
               command: Optional[str] = None, wall_time_min: Optional[float] = None,
               demo_results: Optional[Sequence[Mapping[str, Any]]] = None, overwrite: bool = False,
               timm_native: bool = False) -> Path:
    """Write model.safetensors, config.json and manifest_entry.json for one encoder of a run; return out_dir.
    All three files appear together or not at all, with the same bytes for the same run; a second process
    exporting into the same folder meanwhile gets OutputInUseError naming this one. `timm_native`: the folder
    stock timm loads without flexpredict_zoo (`write_model_folder`); the manifest entry is the same.
    `evaluation` is a manifest `evaluation` record; or pass `demo_results` (results.json records of
    `flexpredict-train demo`, one per training seed) and the record is built from them, the run's seed being the
    shipped one. The entry is checked with the manifest's own rules before anything is written."""
    with folder_lock(out_dir):
        ckpt_path, ckpt = read_run_checkpoint(run)
        key = encoder_key(encoder)
        model_name = ckpt["model_name"]
        model_args = architecture_kwargs(ckpt.get("model_kwargs"))
        model = build_encoder(model_name, model_args, ckpt[key], source=ckpt_path)
        run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        tag = _split_name(name, model_name, re.sub(r"\W", "_", run_dir.resolve().name) or "custom")
        where = f"{model_name}.{tag}"
        training = training_record(ckpt, ckpt_path, recipe, command, hardware, wall_time_min)
        if demo_results is not None:
            if evaluation is not None:
                raise ValueError("pass evaluation or demo_results, not both")
            evaluation = evaluation_record(demo_results, training["seed"])
        if evaluation is not None:
            manifest.validate_evaluation(where, dict(evaluation))
        entry: Dict[str, Any] = {
            "tag": tag, "encoder": key,
            "description": description or f"{'EMA target' if key == 'target_encoder' else 'context'} encoder "
                                          f"trained by flexpredict-train ({run_dir.name})",
            "source": {"package_file": f"weights/{where}.safetensors"},
            "sha256": None,  # of model.safetensors, filled in once it is written
            "license": license, "training": training}
        if evaluation is not None:
            entry["evaluation"] = dict(evaluation)

        def write_entry(path: Path) -> None:
            entry["sha256"] = sha256_file(path.parent / SAFETENSORS_NAME)  # written first, in the same folder
            record = {"model": model_name, "model_args": model_args, "entry": entry}
            path.write_text(json.dumps(record, indent=2) + "\n")

        return write_model_folder(out_dir, model, model_name, key, metadata={"source_file": ckpt_path.name},
                                  model_args=model_args, extra_files={ENTRY_NAME: write_entry}, overwrite=overwrite,
                                  timm_native=timm_native)


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
    parser.add_argument("--command", help="command line that reproduces the run, recorded in the manifest entry")
    parser.add_argument("--hardware", help="hardware the run used, recorded in the manifest entry (e.g. '1x H100')")
    parser.add_argument("--wall-time-min", type=float, help="training wall time in minutes, recorded in the entry")
    parser.add_argument("--evaluation", nargs="+", metavar="JSON",
                        help="results.json of `flexpredict-train demo`, one per training seed (or one file holding "
                             "a manifest evaluation record)")
    parser.add_argument("--description", help="description recorded in the manifest entry")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    parser.add_argument("--timm-native", action="store_true", help=TIMM_NATIVE_HELP)
    return parser


def _read_json(path: PathLike) -> Dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--evaluation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--evaluation file {path} is not JSON ({e})") from None


def run(args: argparse.Namespace) -> int:
    records = [_read_json(path) for path in args.evaluation or ()]
    # One file holding a manifest evaluation record is taken as is; otherwise they are demo results.
    evaluation = records[0] if len(records) == 1 and "seeds" in records[0] else None
    out = export_run(args.run, args.out, encoder=args.encoder, name=args.name, license=args.license,
                     recipe=args.recipe, hardware=args.hardware, evaluation=evaluation,
                     description=args.description, command=args.command, wall_time_min=args.wall_time_min,
                     demo_results=records if records and evaluation is None else None, overwrite=args.overwrite,
                     timm_native=args.timm_native)
    entry = json.loads((out / ENTRY_NAME).read_text())
    weights = out / SAFETENSORS_NAME
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB, sha256 {entry['entry']['sha256'][:16]}...)")
    print(f"wrote {out / CONFIG_NAME} and {out / ENTRY_NAME}")
    if args.timm_native:
        print(f'load it with stock timm: timm.create_model("local-dir:{out}", pretrained=True)')
    print(f"load it with: timm.create_model({entry['model']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(weights)!r}))")
    return 0
