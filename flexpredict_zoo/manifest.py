"""`weights_manifest.json`: the single source of truth for architectures and released weights.

The timm pretrained configs (see `vision_transformer.py`) and `MODEL_CARD.md` are generated from it.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

MANIFEST_NAME = "weights_manifest.json"
_MODEL_KEYS = {"description", "architecture", "data", "pretraining", "reference_results", "weights"}
_ARCH_KEYS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"}
_DATA_KEYS = {"input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"}
_WEIGHT_KEYS = {"tag", "encoder", "description", "source", "sha256", "license", "notes", "training", "evaluation"}
_SOURCE_KEYS = {"hf_hub_id", "hf_hub_filename", "revision", "package_file"}
_NUMBER = (int, float)
_TYPE_NAMES = {(str,): "a string", (int,): "a non-negative integer", _NUMBER: "a non-negative number",
               (dict,): "an object"}
# A weight entry's "training": how weights made by flexpredict-train were trained. `flexpredict-train export`
# writes it, `validate` checks it and MODEL_CARD.md renders it. key -> (allowed types, required).
TRAINING_KEYS: Dict[str, Tuple[tuple, bool]] = {
    "dataset": ((str,), True),
    "iterations": ((int,), True),
    "epochs": (_NUMBER, True),
    "batch_size": ((int,), True),  # images per optimizer step, all processes together
    "seed": ((int,), True),
    "final_loss": (_NUMBER, True),
    "world_size": ((int,), False),  # processes (GPUs) the run used
    "noise_std": (_NUMBER, False),
    "predictor_depth": ((int,), False),
    "recipe": ((str,), False),  # the config file, e.g. train/configs/digits_m4_32.yaml
    "command": ((str,), False),  # the command line that reproduces the run
    "wall_time_min": (_NUMBER, False),
    "hardware": ((str,), False),
}
# A weight entry's "evaluation": frozen-feature top-1 per training seed, as `flexpredict-train demo` measures it.
EVALUATION_KEYS: Dict[str, Tuple[tuple, bool]] = {
    "protocol": ((str,), True), "command": ((str,), True), "shipped_seed": ((int,), True), "seeds": ((dict,), True)}
EVALUATION_REPRESENTATIONS = ("pretrained", "random_init", "pixels")
EVALUATION_METRICS = ("knn_top1", "linear_top1", "few_shot_top1")


class ManifestError(ValueError):
    """The manifest is malformed."""


class UnknownModelError(KeyError):
    """A model name that the manifest does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class WeightEntry:
    model: str
    tag: str
    encoder: str  # checkpoint key of an official training checkpoint: 'target_encoder' or 'encoder'
    source: Dict[str, Any]
    sha256: Optional[str]
    license: str
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"


def manifest_path() -> Path:
    return Path(str(resources.files("flexpredict_zoo").joinpath(MANIFEST_NAME)))


def _check_keys(where: str, got: Dict[str, Any], allowed: set) -> None:
    unknown = set(got) - allowed
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(allowed)}")


def _check_record(where: str, record: Any, keys: Mapping[str, Tuple[tuple, bool]]) -> None:
    """A record of `keys`: a dict, no unknown key, every required key present, each value of its type."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where} must be an object with the keys {sorted(keys)}, got {type(record).__name__}")
    _check_keys(where, record, set(keys))
    missing = sorted(k for k, (_, required) in keys.items() if required and k not in record)
    if missing:
        raise ManifestError(f"{where}: missing required key(s) {missing}; required keys are "
                            f"{sorted(k for k, (_, required) in keys.items() if required)}")
    for key, value in record.items():
        types = keys[key][0]
        numeric = isinstance(value, _NUMBER) and not isinstance(value, bool)
        # bool is an int in Python but never a count; counts, sizes and times are never negative (a loss may be).
        if isinstance(value, bool) or not isinstance(value, types) or (numeric and value < 0 and key != "final_loss"):
            raise ManifestError(f"{where}: {key!r} must be {_TYPE_NAMES[types]}, got {value!r}")


def validate_training(where: str, record: Any) -> None:
    """Check a weight entry's "training" record against TRAINING_KEYS."""
    _check_record(f"{where} training", record, TRAINING_KEYS)


def validate_evaluation(where: str, record: Any) -> None:
    """Check a weight entry's "evaluation": EVALUATION_KEYS, and for every seed each representation's metrics."""
    where = f"{where} evaluation"
    _check_record(where, record, EVALUATION_KEYS)
    if str(record["shipped_seed"]) not in record["seeds"]:
        raise ManifestError(f"{where}: shipped_seed {record['shipped_seed']} has no results in 'seeds' "
                            f"(seeds: {sorted(record['seeds'])})")
    metrics = {m: (_NUMBER, True) for m in EVALUATION_METRICS}
    for seed, results in record["seeds"].items():
        _check_record(f"{where} seed {seed}", results, {r: ((dict,), True) for r in EVALUATION_REPRESENTATIONS})
        for representation, values in results.items():
            _check_record(f"{where} seed {seed} {representation}", values, metrics)


def validate(manifest: Dict[str, Any]) -> Dict[str, Any]:
    if manifest.get("format_version") != 1:
        raise ManifestError(f"unsupported manifest format_version {manifest.get('format_version')!r}; expected 1")
    for name, entry in manifest["models"].items():
        _check_keys(f"model {name}", entry, _MODEL_KEYS)  # a misspelt 'weights' would silently drop the weights
        arch = entry.get("architecture")
        if not arch or set(arch) != _ARCH_KEYS:
            raise ManifestError(f"model {name}: 'architecture' must have exactly the keys {sorted(_ARCH_KEYS)}")
        _check_keys(f"model {name} data", entry.get("data") or {}, _DATA_KEYS)
        if set(entry.get("data") or {}) != _DATA_KEYS:
            raise ManifestError(f"model {name}: 'data' must have exactly the keys {sorted(_DATA_KEYS)}")
        tags = set()
        for weights in entry.get("weights", []):
            _check_keys(f"model {name} weights", weights, _WEIGHT_KEYS)
            _check_keys(f"model {name} weights source", weights["source"], _SOURCE_KEYS)
            if weights["encoder"] not in ("target_encoder", "encoder"):
                raise ManifestError(f"model {name}.{weights['tag']}: encoder must be 'target_encoder' or 'encoder'")
            where = f"model {name}.{weights['tag']}"
            if "training" in weights:
                validate_training(where, weights["training"])
            if "evaluation" in weights:
                validate_evaluation(where, weights["evaluation"])
            if weights["tag"] in tags:
                raise ManifestError(f"model {name}: duplicate tag {weights['tag']!r}")
            tags.add(weights["tag"])
    return manifest


def load_manifest(path: Optional[Path] = None) -> Dict[str, Any]:
    if path is not None:
        return validate(json.loads(Path(path).read_text()))
    return _packaged_manifest()


@lru_cache(maxsize=1)
def _packaged_manifest() -> Dict[str, Any]:
    return validate(json.loads(manifest_path().read_text()))


def model_names() -> List[str]:
    return list(load_manifest()["models"])


def split_name(name: str) -> tuple:
    """'flexpredict_vit_b16.stop_in1k' -> ('flexpredict_vit_b16', 'stop_in1k'); the tag may be absent."""
    model, _, tag = name.partition(".")
    return model, (tag or None)


def model_entry(name: str) -> Dict[str, Any]:
    model, _ = split_name(name)
    models = load_manifest()["models"]
    if model not in models:
        close = difflib.get_close_matches(model, list(models), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown FlexPredict model {model!r}.{hint} Known models: {', '.join(models)} "
            f"(`flexpredict-zoo list` prints them with their weights).")
    return models[model]


def weight_entries(name: str) -> List[WeightEntry]:
    model, _ = split_name(name)
    return [WeightEntry(model=model, tag=w["tag"], encoder=w["encoder"], source=w["source"], sha256=w.get("sha256"),
                        license=w.get("license", ""), description=w.get("description", ""))
            for w in model_entry(model).get("weights", [])]


def weight_entry(name: str) -> WeightEntry:
    """The weights for 'model' (default tag) or 'model.tag'."""
    model, tag = split_name(name)
    entries = weight_entries(model)
    if not entries:
        raise UnknownModelError(f"{model} has no released weights; create it with pretrained=False or pass a file "
                                f"with pretrained_cfg_overlay=dict(file=PATH)")
    if tag is None:
        return entries[0]
    for entry in entries:
        if entry.tag == tag:
            return entry
    raise UnknownModelError(f"{model} has no weights tagged {tag!r}; its tags are {[e.tag for e in entries]}")


def find_weight_entry(hf_hub_id: Optional[str], filename: Optional[str], encoder: Optional[str] = None) -> Optional[WeightEntry]:
    """The manifest entry that a Hub repository and file name belong to (to look up its sha256)."""
    repo = (hf_hub_id or "").split("@")[0]
    for model in model_names():
        for entry in weight_entries(model):
            src = entry.source
            if src.get("hf_hub_id") == repo and src.get("hf_hub_filename") == filename and encoder in (None, entry.encoder):
                return entry
    return None


def pretrained_cfgs() -> Dict[str, Dict[str, Any]]:
    """timm pretrained configs ('model.tag' -> cfg dict), generated from the manifest; the first tag is the default."""
    manifest = load_manifest()
    paper = manifest["paper"]
    cfgs: Dict[str, Dict[str, Any]] = {}
    for model, entry in manifest["models"].items():
        data = entry["data"]
        common = dict(
            num_classes=0, classifier="head", input_size=tuple(data["input_size"]),
            interpolation=data["interpolation"], crop_pct=data["crop_pct"], crop_mode=data["crop_mode"],
            mean=tuple(data["mean"]), std=tuple(data["std"]), first_conv="patch_embed.proj",
            # As timm's own ViTs: the model takes its img_size only, unless built with dynamic_img_size=True.
            fixed_input_size=True, paper_name=paper["published_title"], paper_ids=f"arXiv:{paper['arxiv']}",
            origin_url=paper["official_code"],
        )
        weights = entry.get("weights", [])
        if not weights:
            cfgs[model] = dict(common, description=entry["description"])
            continue
        for w in weights:
            src = w["source"]
            pretraining = entry.get("pretraining", {})
            cfg = dict(common, license=w.get("license"), description=f"{entry['description']}; {w['description']}",
                       notes=tuple(f"{key}={pretraining[key]}" for key in
                                   ("dataset", "epochs", "noise_std", "predictor_depth") if key in pretraining))
            if "hf_hub_id" in src:
                hub_id = src["hf_hub_id"] + (f"@{src['revision']}" if src.get("revision") else "")
                cfg.update(hf_hub_id=hub_id, hf_hub_filename=src["hf_hub_filename"])
            else:
                cfg.update(file=str(manifest_path().parent / src["package_file"]))
            cfgs[f"{model}.{w['tag']}"] = cfg
    return cfgs
