"""Typed training configuration: dataclasses, YAML loading, `key.sub=value` overrides, validation once at the edge.

An unknown or misspelt key anywhere is a `ConfigError` naming the valid keys (and the close matches); values are
converted to the field's type (YAML reads `1e-3` as a string, so floats are parsed here), then range-checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .masks import MaskConfig as _Masks

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, what is wrong and what is valid."""


@dataclass
class ModelConfig:
    name: str = "flexpredict_vit_b16"  # a registered zoo model
    img_size: int = 224
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (e.g. depth for tests)


@dataclass
class PredictorConfig:
    depth: int = 6
    embed_dim: int = 384
    num_heads: Optional[int] = None  # None: the encoder's number of heads, as the official predictor
    noise_std: float = 0.25  # sigma, a standard deviation (the official config calls it `var`)
    drop_path_rate: float = 0.0


@dataclass
class MaskConfig:
    """Multi-block mask parameters (defaults: masks.MaskConfig's); input_size and patch_size come from the model."""
    num_targets: int = _Masks.num_targets
    target_scale: Tuple[float, float] = _Masks.target_scale
    target_aspect: Tuple[float, float] = _Masks.target_aspect
    context_scale: Tuple[float, float] = _Masks.context_scale
    context_aspect: Tuple[float, float] = _Masks.context_aspect
    min_keep: int = _Masks.min_keep
    allow_overlap: bool = _Masks.allow_overlap
    mode: str = _Masks.mode  # "official" keeps the official sampler's last-row/column exclusion
    max_tries: Optional[int] = None  # None: the mask collator's own bound (never hangs)
    relax_every: Optional[int] = None  # None: the mask collator's default


@dataclass
class DataConfig:
    dataset: str = "folder"  # "folder" | "digits" | "synthetic"
    root: Optional[str] = None
    batch_size: int = 64  # per process
    num_workers: int = 8
    pin_memory: bool = True  # used on CUDA only
    drop_last: bool = True
    crop_scale: Tuple[float, float] = (0.3, 1.0)
    hflip: bool = True
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_radius: Tuple[float, float] = (0.1, 2.0)
    color_jitter: float = 0.0
    max_unreadable_fraction: float = 0.01
    synthetic_size: int = 1024
    # "cpu": workers decode (PIL) and augment; "gpu": workers read file bytes, the CUDA device decodes (nvJPEG) and
    # augments (gpu_data.py), for when CPU workers cannot keep up with the step. Folders only; needs CUDA.
    decode: str = "cpu"
    # data.decode=gpu: batches decoded and augmented ahead of the step by a background thread on a CUDA stream of
    # its own, so decoding overlaps the training step (0: in the training loop, one after the other)
    prefetch: int = 1


@dataclass
class OptimConfig:
    epochs: int = 600
    iterations_per_epoch: Optional[int] = None  # None: len(loader)
    ipe_scale: float = 1.0
    lr_start: float = 2e-4
    lr_peak: float = 8e-4
    lr_final: float = 1e-4
    warmup_epochs: float = 15
    wd_start: float = 0.04
    wd_final: float = 0.4
    constant_from_epoch: Optional[float] = None  # ViT-H: lr and wd held constant from epoch 250
    ema_start: float = 0.996
    ema_end: float = 1.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None
    fused: Union[bool, str] = "auto"  # "auto": fused AdamW on CUDA, foreach otherwise


@dataclass
class RunConfig:
    output_dir: str = "runs/flexpredict"
    seed: int = 0
    precision: str = "auto"  # "auto" | "bf16" | "fp16" | "fp32"
    log_every: int = 10  # iterations; the only host synchronisation of the loss
    checkpoint_every: int = 1000  # iterations: latest.pt
    keep_every: Optional[int] = None  # iterations: iter_XXXXXXX.pt kept for good (None: only the final one)
    max_steps: Optional[int] = None  # stop after this many iterations in total (tests, demos)
    resume: Union[bool, str] = "auto"  # "auto": continue from checkpoints/latest.pt when present; or a path
    init_from: Optional[str] = None  # official StoP checkpoint to start from
    compile: bool = False
    # torch.compile mode with run.compile (null: Inductor's default). max-autotune-no-cudagraphs tunes the matmul and
    # reduction kernels (compiles longer); reduce-overhead and max-autotune add CUDA graphs, recorded once per
    # distinct (context, target) mask length pair (54 in 200 batches of 128, B/16 masks): no launch overhead
    compile_mode: Optional[str] = None
    device: str = "auto"  # "auto" | "cpu" | "cuda"


# torch.compile's modes (torch._inductor.list_mode_options)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Nested plain dict (tuples as lists), suitable for YAML and for weights_only checkpoints."""
        return _plain(asdict(self))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- conversion

def _unknown_key(where: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(where + c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'.{hint} Valid keys{' in ' + where.rstrip('.') if where else ''}: "
                       f"{', '.join(valid)}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if tp is Any:
        return value
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(where, str(key), valid)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _convert(value, tp, f"{where}{key}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- overrides

def parse_override(text: str) -> Tuple[List[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr_peak=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    data = _plain(dict(data or {}))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------- loading

def resolve_config_path(name: Union[str, Path]) -> Path:
    """A YAML path, or the name of a shipped config (`vit_b16` -> train/configs/vit_b16.yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file() and len(path.parts) == 1:
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {name} not found; pass a YAML path or one of the shipped configs: {', '.join(names)}")


def from_dict(data: Dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    cfg = _build(TrainConfig, apply_overrides(data, overrides), "")
    validate(cfg)
    return cfg


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    data: Dict[str, Any] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            data = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{resolved} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{resolved} must hold a mapping of sections ({', '.join(_SECTIONS)})")
    return from_dict(data, overrides)


_SECTIONS = [f.name for f in dataclasses.fields(TrainConfig)]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    _check(value in choices, f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_finite(cfg: TrainConfig) -> None:
    # YAML reads .nan and .inf as floats: no bound below would catch them (every comparison with NaN is False).
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            numbers = value if isinstance(value, list) else [value]
            bad = [v for v in numbers if isinstance(v, float) and not math.isfinite(v)]
            _check(not bad, f"config key '{section}.{key}' must be a finite number, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    m, p, k, d, o, r = cfg.model, cfg.predictor, cfg.mask, cfg.data, cfg.optim, cfg.run
    _check_finite(cfg)
    import timm

    import flexpredict_zoo  # noqa: F401  (registers the models)
    _check(timm.is_model(m.name) and m.name.startswith("flexpredict_"),
           f"config key 'model.name': {m.name!r} is not a zoo model; valid: "
           f"{', '.join(timm.list_models('flexpredict_*'))}")
    _check(m.img_size > 0, "config key 'model.img_size' must be positive")
    _check(0.0 <= m.drop_path_rate < 1.0, "config key 'model.drop_path_rate' must be in [0, 1)")
    _check(p.depth >= 1 and p.embed_dim >= 1, "config keys 'predictor.depth' and 'predictor.embed_dim' must be >= 1")
    _check(p.noise_std >= 0, "config key 'predictor.noise_std' (a standard deviation) must be >= 0")
    _check(p.num_heads is None or (p.num_heads >= 1 and p.embed_dim % p.num_heads == 0),
           f"config key 'predictor.num_heads' must divide predictor.embed_dim={p.embed_dim}")
    _check(k.num_targets >= 1 and k.min_keep >= 0, "config keys 'mask.num_targets' >= 1 and 'mask.min_keep' >= 0")
    _choice("mask.mode", k.mode, ("corrected", "official"))
    for name in ("target_scale", "context_scale"):
        lo, hi = getattr(k, name)
        _check(0 < lo <= hi <= 1, f"config key 'mask.{name}' must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
    _choice("data.dataset", d.dataset, ("folder", "digits", "synthetic"))
    _check(d.dataset != "folder" or d.root, "config key 'data.root' is required for data.dataset=folder "
                                            "(an ImageNet-style folder, e.g. data.root=/data/imagenet/train)")
    _check(d.batch_size >= 1 and d.num_workers >= 0, "config keys 'data.batch_size' >= 1 and 'data.num_workers' >= 0")
    _check(0 <= d.max_unreadable_fraction <= 1, "config key 'data.max_unreadable_fraction' must be in [0, 1]")
    _choice("data.decode", d.decode, ("cpu", "gpu"))
    _check(isinstance(d.prefetch, int) and d.prefetch >= 0,
           f"data.prefetch must be a whole number >= 0 (batches decoded ahead; 0: none), got {d.prefetch!r}")
    _check(d.decode == "cpu" or d.dataset == "folder",
           f"data.decode=gpu decodes image files on the GPU, and data.dataset={d.dataset} has none; use data.decode=cpu")
    _check(d.decode == "cpu" or d.color_jitter == 0,
           "data.decode=gpu has no colour jitter (the official recipes use strength 0); set data.color_jitter=0 or "
           "use data.decode=cpu")
    _check(o.epochs >= 1, "config key 'optim.epochs' must be >= 1")
    _check(o.iterations_per_epoch is None or o.iterations_per_epoch >= 1,
           "config key 'optim.iterations_per_epoch' must be >= 1 or null")
    _check(o.ipe_scale > 0 and o.warmup_epochs >= 0, "config keys 'optim.ipe_scale' > 0 and 'optim.warmup_epochs' >= 0")
    _check(min(o.lr_start, o.lr_peak, o.lr_final, o.wd_start, o.wd_final) >= 0, "learning rates and weight decays must be >= 0")
    _check(0 <= o.ema_start <= o.ema_end <= 1, "config keys must satisfy 0 <= optim.ema_start <= optim.ema_end <= 1")
    _check(o.clip_grad is None or o.clip_grad > 0, "config key 'optim.clip_grad' must be > 0 or null")
    _check(o.fused in (True, False, "auto"), f"config key 'optim.fused' must be true, false or auto, got {o.fused!r}")
    _choice("run.precision", r.precision, ("auto", "bf16", "fp16", "fp32"))
    _check(r.compile_mode is None or r.compile_mode in COMPILE_MODES,
           f"config key 'run.compile_mode' must be null or one of {', '.join(COMPILE_MODES)}, got {r.compile_mode!r}")
    _check(r.compile_mode is None or r.compile, f"run.compile_mode={r.compile_mode} applies to compiled networks; "
                                                 f"set run.compile=true as well (or leave run.compile_mode null)")
    _choice("run.device", r.device.split(":")[0], ("auto", "cpu", "cuda"))
    _check(r.log_every >= 1 and r.checkpoint_every >= 1, "config keys 'run.log_every' and 'run.checkpoint_every' must be >= 1")
    _check(r.keep_every is None or r.keep_every >= 1, "config key 'run.keep_every' must be >= 1 or null")
    _check(r.max_steps is None or r.max_steps >= 1, "config key 'run.max_steps' must be >= 1 or null")
    _check(isinstance(r.resume, bool) or r.resume == "auto" or bool(r.resume),
           "config key 'run.resume' must be auto, true, false or a checkpoint path")
