"""train/export.py: loading a run's encoder and exporting it into the zoo format (round trip through timm)."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file as load_safetensors

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import CheckpointError, sha256_file
from flexpredict_zoo.train import export

TINY = dict(embed_dim=32, depth=2, num_heads=2)
MODEL = "flexpredict_vit_m4_32"


def write_run(run_dir: Path, arch: dict = TINY, seed: int = 0) -> Path:
    """A run folder as flexpredict-train writes it (TRAIN_API.md): checkpoints/latest.pt with both encoders,
    the context encoder deliberately different from the target one."""
    torch.manual_seed(seed)
    model_kwargs = dict(arch, img_size=32, drop_path_rate=0.1)
    target = timm.create_model(MODEL, **model_kwargs)
    context = copy.deepcopy(target)
    with torch.no_grad():
        for p in context.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"encoder": context.state_dict(), "target_encoder": target.state_dict(), "predictor": {},
            "optimizer": {}, "scaler": None, "iteration": 1500, "epoch": 74, "model_name": MODEL,
            "model_kwargs": model_kwargs, "loss": 0.0421, "rng": {}, "sampler": {}, "mask_generator": {},
            "config": {"data": {"dataset": "digits", "batch_size": 64}, "predictor": {"noise_std": 0.25, "depth": 3},
                       "run": {"seed": seed}}}
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, run_dir / "checkpoints" / "latest.pt")
    return run_dir


def reference_encoder(run_dir: Path, key: str = "target_encoder"):
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    model = timm.create_model(MODEL, **TINY)
    model.load_state_dict(ckpt[key])
    return model.eval()


def test_load_run_encoder_target_and_context(tmp_path):
    run_dir = write_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for encoder, key in (("target", "target_encoder"), ("context", "encoder")):
            model = export.load_run_encoder(run_dir, encoder)
            assert not model.training
            assert torch.equal(model(x), reference_encoder(run_dir, key)(x))
            # the checkpoint file itself works as well as the run folder
            assert torch.equal(export.load_run_encoder(run_dir / "checkpoints" / "latest.pt", encoder)(x), model(x))
        assert not torch.allclose(export.load_run_encoder(run_dir, "target")(x), export.load_run_encoder(run_dir, "context")(x))


def test_loading_errors_say_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="not a training run folder"):
        export.load_run_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        export.load_encoder(str(tmp_path / "nothing.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flexpredict-train checkpoint"):
        export.load_run_encoder(tmp_path / "other.pt")
    with pytest.raises(manifest.UnknownModelError, match="flexpredict_vit_b16"):
        export.load_encoder("flexpredict_vit_b61")


def test_export_round_trip_through_timm(tmp_path):
    run_dir = write_run(tmp_path / "digits_run")
    evaluation = {"digits_knn_top1": 73.2}
    out = export.export_run(run_dir, tmp_path / "export", name=f"{MODEL}.digits_stop", recipe="train/configs/x.yaml",
                            hardware="1x H100", evaluation=evaluation)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest_entry.json", "model.safetensors"]
    x = torch.randn(3, 3, 32, 32)
    loaded = timm.create_model(MODEL, pretrained=True, **TINY,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference_encoder(run_dir)(x))
        assert torch.equal(export.load_run_encoder(out)(x), loaded(x))  # config.json model_args rebuild the tiny arch
        assert torch.equal(export.load_encoder(f"local-dir:{out}")(x), loaded(x))  # timm's own folder loader
    tensors = load_safetensors(str(out / "model.safetensors"))
    assert "pos_embed" not in tensors and set(tensors) == set(reference_encoder(run_dir).state_dict())

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == MODEL and config["num_features"] == 32 and config["global_pool"] == "avg"
    assert config["model_args"] == dict(TINY, img_size=32)  # drop_path_rate is training-only, not exported
    assert config["pretrained_cfg"]["notes"] == ["encoder=target_encoder"]

    record = json.loads((out / "manifest_entry.json").read_text())
    entry = record["entry"]
    assert record["model"] == MODEL and entry["tag"] == "digits_stop" and entry["encoder"] == "target_encoder"
    assert entry["sha256"] == sha256_file(out / "model.safetensors")
    assert entry["source"] == {"package_file": f"weights/{MODEL}.digits_stop.safetensors"}
    assert entry["training"] == {"recipe": "train/configs/x.yaml", "dataset": "digits", "iterations": 1500, "epochs": 74,
                                 "final_loss": pytest.approx(0.0421), "batch_size_per_process": 64, "noise_std": 0.25,
                                 "predictor_depth": 3, "seed": 0, "hardware": "1x H100"}
    assert entry["evaluation"] == evaluation
    # the entry is valid in the manifest as it stands (replacing a shipped entry of the same tag, if any)
    data = copy.deepcopy(manifest.load_manifest())
    weights = data["models"][MODEL]["weights"]
    weights[:] = [w for w in weights if w["tag"] != entry["tag"]] + [entry]
    manifest.validate(data)


def test_export_context_encoder_default_tag_and_no_partial_overwrite(tmp_path):
    run_dir = write_run(tmp_path / "my-run")
    out = export.export_run(run_dir, tmp_path / "ctx", encoder="context")
    entry = json.loads((out / "manifest_entry.json").read_text())["entry"]
    assert entry["tag"] == "my_run" and entry["encoder"] == "encoder"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(export.load_run_encoder(out)(x), reference_encoder(run_dir, "encoder")(x))
    before = sha256_file(out / "model.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_run(run_dir, out, encoder="target")
    assert sha256_file(out / "model.safetensors") == before
    export.export_run(run_dir, out, encoder="target", overwrite=True)
    assert sha256_file(out / "model.safetensors") != before
    with pytest.raises(ValueError, match="names model"):
        export.export_run(run_dir, tmp_path / "bad", name="flexpredict_vit_b16.x")
    assert not (tmp_path / "bad").exists()


def test_export_cli(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    (tmp_path / "results.json").write_text(json.dumps({"knn_top1": 70.0}))
    parser = export.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(run_dir), "--out", str(tmp_path / "out"), "--name", "digits_stop",
                              "--evaluation", str(tmp_path / "results.json")])
    assert export.run(args) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "pretrained_cfg_overlay" in out
    assert json.loads((tmp_path / "out" / "manifest_entry.json").read_text())["entry"]["evaluation"] == {"knn_top1": 70.0}
