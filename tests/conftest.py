"""Shared fixtures: official-format checkpoints of random weights and a local Hugging Face cache (no network)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TINY_ARCH = dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=224)


def official_encoder_state(embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, img_size: int = 224,
                           in_chans: int = 3, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Random encoder weights with the official StoP key names (without the DDP prefix)."""
    g = generator or torch.Generator().manual_seed(0)
    grid = img_size // patch_size

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {"patch_embed.proj.weight": rnd(embed_dim, in_chans, patch_size, patch_size),
          "patch_embed.proj.bias": rnd(embed_dim),
          "pos_embed": rnd(1, grid * grid, embed_dim)}
    hidden = embed_dim * 4
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rnd(embed_dim, scale=0.1), p + "norm1.bias": rnd(embed_dim),
                   p + "attn.qkv.weight": rnd(3 * embed_dim, embed_dim), p + "attn.qkv.bias": rnd(3 * embed_dim),
                   p + "attn.proj.weight": rnd(embed_dim, embed_dim), p + "attn.proj.bias": rnd(embed_dim),
                   p + "norm2.weight": 1 + rnd(embed_dim, scale=0.1), p + "norm2.bias": rnd(embed_dim),
                   p + "mlp.fc1.weight": rnd(hidden, embed_dim), p + "mlp.fc1.bias": rnd(hidden),
                   p + "mlp.fc2.weight": rnd(embed_dim, hidden), p + "mlp.fc2.bias": rnd(embed_dim)})
    sd.update({"norm.weight": 1 + rnd(embed_dim, scale=0.1), "norm.bias": rnd(embed_dim)})
    return sd


def official_predictor_state(embed_dim: int, num_patches: int, depth: int = 2, predictor_dim: int = 384,
                             generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    g = generator or torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    d, h = predictor_dim, predictor_dim * 4
    sd = {"mask_token": rnd(1, 1, d), "predictor_embed.weight": rnd(d, embed_dim), "predictor_embed.bias": rnd(d),
          "predictor_pos_embed": rnd(1, num_patches, d)}
    for i in range(depth):
        p = f"predictor_blocks.{i}."
        sd.update({p + "norm1.weight": torch.ones(d), p + "norm1.bias": rnd(d), p + "attn.qkv.weight": rnd(3 * d, d),
                   p + "attn.qkv.bias": rnd(3 * d), p + "attn.proj.weight": rnd(d, d), p + "attn.proj.bias": rnd(d),
                   p + "norm2.weight": torch.ones(d), p + "norm2.bias": rnd(d), p + "mlp.fc1.weight": rnd(h, d),
                   p + "mlp.fc1.bias": rnd(h), p + "mlp.fc2.weight": rnd(d, h), p + "mlp.fc2.bias": rnd(d)})
    sd.update({"predictor_norm.weight": torch.ones(d), "predictor_norm.bias": rnd(d),
               "predictor_proj.weight": rnd(embed_dim, d), "predictor_proj.bias": rnd(embed_dim)})
    return sd


def make_official_checkpoint(path: Path, arch: Optional[dict] = None, seed: int = 0, optimizer_mb: float = 0.0) -> dict:
    """Write a training checkpoint in the official StoP format (module.-prefixed, optimizer state included)."""
    arch = dict(TINY_ARCH, **(arch or {}))
    g = torch.Generator().manual_seed(seed)
    encoder = official_encoder_state(**arch, generator=g)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in encoder.items()}
    grid = arch["img_size"] // arch["patch_size"]
    predictor = official_predictor_state(arch["embed_dim"], grid * grid, generator=g)
    n_opt = int(optimizer_mb * (1 << 20) / 4)
    opt_state = {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(n_opt // 2 or 1, generator=g),
                     "exp_avg_sq": torch.rand(n_opt // 2 or 1, generator=g)}}
    ckpt = {
        "encoder": {f"module.{k}": v for k, v in encoder.items()},
        "predictor": {f"module.{k}": v for k, v in predictor.items()},
        "target_encoder": {f"module.{k}": v for k, v in target.items()},
        "opt": {"state": opt_state, "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": [0]}]},
        "scaler": None, "epoch": 600, "loss": 0.123, "batch_size": 64, "world_size": 32, "lr": 1e-4,
    }
    torch.save(ckpt, path)
    return ckpt


def build_hf_cache(cache_dir: Path, repo_id: str, files: Dict[str, Path], revision: Optional[str] = None) -> str:
    """Lay out `files` as a Hugging Face Hub cache (the hub directory itself) for repo `repo_id`; return the commit."""
    commit = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(Path(src).read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)  # no trailing newline, as the Hub client writes it
    return commit


@pytest.fixture
def official_checkpoint(tmp_path):
    path = tmp_path / "vit-ti16.pth.tar"
    ckpt = make_official_checkpoint(path)
    return path, ckpt


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache directory that huggingface_hub uses for this test (HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


# ------------------------------------------------------------------ flexpredict-train runs (export, demo, eval, CLI tests)
RUN_MODEL = "flexpredict_vit_m4_32"
RUN_ARCH = dict(embed_dim=32, depth=2, num_heads=2)  # a tiny flexpredict_vit_m4_32 (32x32 input, patch 4)
TINY_TRAIN_OVERRIDES = ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "predictor.depth=1",
                        "predictor.embed_dim=16", "predictor.num_heads=2", "data.synthetic_size=16",
                        "data.batch_size=4", "run.device=cpu"]


def write_run(run_dir: Path, arch: Optional[dict] = None, seed: int = 0) -> Path:
    """A run folder holding checkpoints/latest.pt with the keys flexpredict-train writes, random weights in
    seconds; the context encoder deliberately differs from the target one."""
    import copy
    import timm
    import flexpredict_zoo  # noqa: F401  (registers the models)
    torch.manual_seed(seed)
    model_kwargs = dict(arch or RUN_ARCH, img_size=32, drop_path_rate=0.1)
    target = timm.create_model(RUN_MODEL, **model_kwargs)
    context = copy.deepcopy(target)
    with torch.no_grad():
        for p in context.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"encoder": context.state_dict(), "target_encoder": target.state_dict(), "predictor": {},
            "optimizer": {}, "scaler": None, "iteration": 1500, "epoch": 74, "model_name": RUN_MODEL,
            "model_kwargs": model_kwargs, "loss": 0.0421, "rng": {"world_size": 1, "ranks": []},
            "sampler": {"epoch": 74, "batches_done": 20, "iterations_per_epoch": 20, "batch_size": 64,
                        "world_size": 1, "seed": seed}, "mask_generator": {},
            "config": {"data": {"dataset": "digits", "batch_size": 64}, "predictor": {"noise_std": 0.25, "depth": 3},
                       "run": {"seed": seed}}}
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, run_dir / "checkpoints" / "latest.pt")
    return run_dir


def reference_encoder(run_dir: Path, key: str = "target_encoder", arch: Optional[dict] = None):
    """The run's encoder loaded by hand: the architecture built directly, its state dict loaded as saved."""
    import timm
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    model = timm.create_model(RUN_MODEL, **(arch or RUN_ARCH))
    model.load_state_dict(ckpt[key])
    return model.eval()


def train_tiny_run(run_dir: Path, steps: int = 2, seed: int = 0) -> Path:
    """A real flexpredict-train run (tiny_cpu recipe, RUN_ARCH encoder, synthetic data) of `steps` iterations."""
    from flexpredict_zoo.train import cli
    code = cli.main(["--config", "tiny_cpu", *TINY_TRAIN_OVERRIDES, f"run.output_dir={run_dir}",
                     f"run.max_steps={steps}", f"run.seed={seed}"])
    assert code == 0 and (run_dir / "checkpoints" / "latest.pt").is_file()
    return run_dir


# ------------------------------------------------------------------ flexpredict-train eval
@pytest.fixture
def features_cache(tmp_path, monkeypatch):
    """The default feature-store cache of `flexpredict-train eval`, in a fresh folder for this test."""
    cache = tmp_path / "features_cache"
    monkeypatch.setenv("FLEXPREDICT_FEATURES_CACHE", str(cache))
    return cache


_HOLD_LOCK = """
import sys, time
from flexpredict_zoo.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_by_another_process(lock_file: Path, output: Path, job: str = "process"):
    """A second process that holds `lock_file` (locks.output_lock) until the block ends; yields its pid."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock_file), str(output), job],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
