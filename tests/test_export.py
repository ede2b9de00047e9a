"""train/export.py: a run's encoder exported into the zoo format, joined to the manifest and the model card."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors

import flexpredict_zoo  # noqa: F401  (registers the models)
from conftest import RUN_ARCH, RUN_MODEL, reference_encoder, train_tiny_run, write_run
from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import CheckpointError, ChecksumError, sha256_file
from flexpredict_zoo.encoders import load_encoder
from flexpredict_zoo.model_card import render_model_card
from flexpredict_zoo.train import export


def demo_record(seed: int, knn: float) -> dict:
    """A results.json as `flexpredict-train demo` writes it (the fields the evaluation record reads)."""
    result = {"knn_top1": knn, "linear_top1": 90.5, "few_shot_top1": 61.25, "few_shot_std": 2.0, "dim": 32}
    return {"model": RUN_MODEL, "layers": "last", "dataset": "scikit-learn digits", "train_images": 1297,
            "heldout_images": 500, "knn_k": 20, "shots": 5, "few_shot_draws": 10, "seed": seed,
            "results": {"pretrained": result, "random_init": dict(result, knn_top1=40.0),
                        "pixels": dict(result, knn_top1=97.8, dim=64)}}


def manifest_with(entry_record: dict, path: Path) -> Path:
    """A copy of the packaged manifest with the exported entry added (replacing a shipped entry of its tag)."""
    data = copy.deepcopy(manifest.load_manifest())
    weights = data["models"][entry_record["model"]]["weights"]
    entry = entry_record["entry"]
    weights[:] = [w for w in weights if w["tag"] != entry["tag"]] + [entry]
    path.write_text(json.dumps(data, indent=2))
    return path


def test_trained_run_exports_into_a_valid_manifest_entry_and_card(tmp_path, monkeypatch):
    """Train a tiny run with flexpredict-train, export it, add the entry to a copy of the manifest: the copy
    loads (validate), the weights load through timm with their recorded sha256, and the card renders the
    entry's own figures."""
    run_dir = train_tiny_run(tmp_path / "tiny_run", steps=2, seed=3)
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    out = export.export_run(run_dir, tmp_path / "export", name="tiny_stop", recipe="train/configs/tiny_cpu.yaml",
                            hardware="a CPU", wall_time_min=0.5, command="flexpredict-train --config tiny_cpu",
                            demo_results=[demo_record(3, 55.5), demo_record(4, 44.25)])
    record = json.loads((out / "manifest_entry.json").read_text())
    entry = record["entry"]
    assert record["model"] == RUN_MODEL and record["model_args"] == dict(RUN_ARCH, img_size=32)
    assert entry["training"] == {
        "dataset": "synthetic", "iterations": 2, "epochs": 0, "batch_size": 4, "seed": 3,
        "final_loss": pytest.approx(ckpt["loss"]), "world_size": 1, "noise_std": 0.25, "predictor_depth": 1,
        "recipe": "train/configs/tiny_cpu.yaml", "command": "flexpredict-train --config tiny_cpu",
        "hardware": "a CPU", "wall_time_min": 0.5}
    assert set(entry["training"]) <= set(manifest.TRAINING_KEYS)
    assert entry["evaluation"]["shipped_seed"] == 3 and sorted(entry["evaluation"]["seeds"]) == ["3", "4"]
    assert entry["evaluation"]["seeds"]["4"]["pretrained"]["knn_top1"] == 44.25

    path = manifest_with(record, tmp_path / "weights_manifest.json")
    copied = manifest.load_manifest(path)  # validates, training and evaluation sections included
    card = render_model_card(copied)
    assert (f"`{RUN_MODEL}.tiny_stop` was trained by `flexpredict-train` with `train/configs/tiny_cpu.yaml` on "
            f"synthetic: 2 iterations (0 epochs), batch 4, seed 3, positional noise std 0.25, predictor depth 1, "
            f"0 minutes on a CPU, final loss {ckpt['loss']:.4f}. Reproduce: `flexpredict-train --config tiny_cpu`."
            ) in card
    assert "the shipped weights are seed 3" in card
    assert "| 3 | FlexPredict (pretrained) | 55.5 | 90.5 | 61.2 |" in card
    assert "| 4 | FlexPredict (pretrained) | 44.2 | 90.5 | 61.2 |" in card
    assert "| `tiny_stop` | `target_encoder`: EMA target encoder trained by flexpredict-train (tiny_run) |" in card
    assert f"`{entry['sha256']}`" in card

    # Shipped as the entry says (the file under the manifest's folder), the weights load through timm by tag,
    # checked against the entry's sha256, and equal the run's target encoder; a tampered file is refused.
    package = tmp_path / "package"
    (package / "weights").mkdir(parents=True)
    (package / "weights_manifest.json").write_text(path.read_text())
    shipped = package / entry["source"]["package_file"]
    shipped.write_bytes((out / "model.safetensors").read_bytes())
    monkeypatch.setattr(manifest, "manifest_path", lambda: package / "weights_manifest.json")
    monkeypatch.setattr(manifest, "load_manifest", lambda path=None: copied)

    def by_tag():
        return timm.create_model(RUN_MODEL, pretrained=True, **record["model_args"],
                                 pretrained_cfg_overlay=dict(file=str(shipped), tag="tiny_stop")).eval()

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_tag()(x), reference_encoder(run_dir)(x))
    shipped.write_bytes(shipped.read_bytes()[:-1] + b" ")
    with pytest.raises(ChecksumError, match=f"expected {entry['sha256']}"):
        by_tag()


def test_export_round_trip_through_timm(tmp_path):
    run_dir = write_run(tmp_path / "digits_run")
    out = export.export_run(run_dir, tmp_path / "export", name=f"{RUN_MODEL}.digits_stop",
                            recipe="train/configs/x.yaml", hardware="1x H100")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest_entry.json", "model.safetensors"]
    x = torch.randn(3, 3, 32, 32)
    loaded = timm.create_model(RUN_MODEL, pretrained=True, **RUN_ARCH,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference_encoder(run_dir)(x))
        assert torch.equal(load_encoder(out)(x), loaded(x))  # config.json model_args rebuild the tiny arch
        assert torch.equal(load_encoder(f"local-dir:{out}")(x), loaded(x))  # timm's own folder loader
    tensors = load_safetensors(str(out / "model.safetensors"))
    assert "pos_embed" not in tensors and set(tensors) == set(reference_encoder(run_dir).state_dict())

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == RUN_MODEL and config["num_features"] == 32 and config["global_pool"] == "avg"
    assert config["model_args"] == dict(RUN_ARCH, img_size=32)  # drop_path_rate is training-only, not exported
    assert config["encoder"] == "target_encoder"  # a key of its own, not a free-text note
    assert not any("encoder" in str(n) for n in config["pretrained_cfg"].get("notes", []))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["encoder"] == "target_encoder" and metadata["source_file"] == "latest.pt"

    record = json.loads((out / "manifest_entry.json").read_text())
    entry = record["entry"]
    assert record["model"] == RUN_MODEL and entry["tag"] == "digits_stop" and entry["encoder"] == "target_encoder"
    assert entry["sha256"] == sha256_file(out / "model.safetensors")
    assert entry["source"] == {"package_file": f"weights/{RUN_MODEL}.digits_stop.safetensors"}
    assert entry["training"] == {"dataset": "digits", "iterations": 1500, "epochs": 74, "batch_size": 64,
                                 "seed": 0, "final_loss": pytest.approx(0.0421), "world_size": 1, "noise_std": 0.25,
                                 "predictor_depth": 3, "recipe": "train/configs/x.yaml", "hardware": "1x H100"}
    assert "evaluation" not in entry
    # Valid: the manifest with the entry (replacing the shipped entry of the same tag) loads, and the card
    # renders the entry's training record.
    copied = manifest.load_manifest(manifest_with(record, tmp_path / "weights_manifest.json"))
    card = render_model_card(copied)
    assert (f"`{RUN_MODEL}.digits_stop` was trained by `flexpredict-train` with `train/configs/x.yaml` on digits: "
            f"1500 iterations (74 epochs), batch 64, seed 0, positional noise std 0.25, predictor depth 3, "
            f"on 1x H100, final loss 0.0421.") in card


def test_export_context_encoder_default_tag_and_no_partial_overwrite(tmp_path):
    run_dir = write_run(tmp_path / "my-run")
    out = export.export_run(run_dir, tmp_path / "ctx", encoder="context")
    entry = json.loads((out / "manifest_entry.json").read_text())["entry"]
    assert entry["tag"] == "my_run" and entry["encoder"] == "encoder"
    assert json.loads((out / "config.json").read_text())["encoder"] == "encoder"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_encoder(out)(x), reference_encoder(run_dir, "encoder")(x))
    with pytest.raises(CheckpointError, match="holds the encoder only"):
        load_encoder(out, "target")
    before = sha256_file(out / "model.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_run(run_dir, out, encoder="target")
    assert sha256_file(out / "model.safetensors") == before
    export.export_run(run_dir, out, encoder="target", overwrite=True)
    assert sha256_file(out / "model.safetensors") != before
    with pytest.raises(ValueError, match="names model"):
        export.export_run(run_dir, tmp_path / "bad", name="flexpredict_vit_b16.x")
    assert not (tmp_path / "bad").exists()


def test_export_refuses_what_the_manifest_would_refuse(tmp_path):
    run_dir = write_run(tmp_path / "run")
    with pytest.raises(manifest.ManifestError, match=r"unknown key\(s\) \['digits_knn_top1'\]; valid keys are"):
        export.export_run(run_dir, tmp_path / "a", evaluation={"digits_knn_top1": 73.2})
    with pytest.raises(manifest.ManifestError, match="'wall_time_min' must be a non-negative number, got -3"):
        export.export_run(run_dir, tmp_path / "b", wall_time_min=-3)
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    del ckpt["sampler"]
    torch.save(ckpt, run_dir / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match=r"does not record \['sampler.world_size'\]"):
        export.export_run(run_dir, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_export_cli(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    for seed, knn in ((0, 70.0), (1, 65.0)):
        (tmp_path / f"results_{seed}.json").write_text(json.dumps(demo_record(seed, knn)))
    parser = export.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(run_dir), "--out", str(tmp_path / "out"), "--name", "digits_stop",
                              "--wall-time-min", "46.4", "--evaluation", str(tmp_path / "results_0.json"),
                              str(tmp_path / "results_1.json")])
    assert export.run(args) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "pretrained_cfg_overlay" in out
    entry = json.loads((tmp_path / "out" / "manifest_entry.json").read_text())["entry"]
    assert entry["training"]["wall_time_min"] == 46.4
    evaluation = entry["evaluation"]
    assert evaluation["shipped_seed"] == 0 and evaluation["command"] == export.EVALUATION_COMMAND
    assert {s: r["pretrained"]["knn_top1"] for s, r in evaluation["seeds"].items()} == {"0": 70.0, "1": 65.0}
    assert "500 held-out images of scikit-learn digits" in evaluation["protocol"]


def test_same_run_same_bytes(tmp_path):
    # one run exported three times gave three sha256 (safetensors metadata in hash-map order) before the fix
    run_dir = write_run(tmp_path / "run")
    digests = []
    for i in range(3):
        out = export.export_run(run_dir, tmp_path / f"out{i}", name="digits_stop")
        digests.append({p.name: sha256_file(p) for p in sorted(out.iterdir())})
    assert digests[0] == digests[1] == digests[2]
    assert sorted(digests[0]) == ["config.json", "manifest_entry.json", "model.safetensors"]


def test_second_process_exporting_into_the_same_folder_is_refused(tmp_path):
    from conftest import lock_held_by_another_process
    from flexpredict_zoo.cli import run_command
    from flexpredict_zoo.locks import OutputInUseError, lock_path_beside

    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "out"
    with lock_held_by_another_process(lock_path_beside(out), out, "export") as pid:
        with pytest.raises(OutputInUseError, match=f"{out} is in use: process {pid} on "):
            export.export_run(run_dir, out)
        args = export.add_arguments(argparse.ArgumentParser()).parse_args([str(run_dir), "--out", str(out)])
        assert run_command(export.run, args) == 2  # one `error: ...` line, as every user error
    assert not out.exists()
    export.export_run(run_dir, out)
    assert (out / "manifest_entry.json").is_file()


@pytest.mark.parametrize("change,message", [
    (dict(batch=64), r"training: unknown key\(s\) \['batch'\]; valid keys are \['batch_size', 'command', "),
    (dict(iterations=None), r"training: missing required key\(s\) \['iterations'\]; required keys are "
                            r"\['batch_size', 'dataset', 'epochs', 'final_loss', 'iterations', 'seed'\]"),
    (dict(seed=True), r"training: 'seed' must be a non-negative integer, got True"),
    (dict(epochs="150"), r"training: 'epochs' must be a non-negative number, got '150'"),
    (dict(batch_size=-64), r"training: 'batch_size' must be a non-negative integer, got -64"),
])
def test_manifest_validates_the_training_record(change, message):
    data = copy.deepcopy(manifest.load_manifest())
    training = data["models"][RUN_MODEL]["weights"][0]["training"]  # the shipped demo model's record
    for key, value in change.items():
        if value is None:
            del training[key]
        else:
            training[key] = value
    with pytest.raises(manifest.ManifestError, match=f"model {RUN_MODEL}.digits_stop {message}"):
        manifest.validate(data)


def test_manifest_validates_the_evaluation_record():
    data = copy.deepcopy(manifest.load_manifest())
    evaluation = data["models"][RUN_MODEL]["weights"][0]["evaluation"]
    del evaluation["seeds"]["1"]["pixels"]["knn_top1"]
    with pytest.raises(manifest.ManifestError, match=r"evaluation seed 1 pixels: missing required key\(s\) \['knn_top1'\]"):
        manifest.validate(data)
    evaluation["seeds"] = {"1": evaluation["seeds"]["2"]}
    with pytest.raises(manifest.ManifestError, match=r"shipped_seed 0 has no results in 'seeds'"):
        manifest.validate(data)
