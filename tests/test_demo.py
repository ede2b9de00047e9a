"""train/demo.py: the README's main job, end to end on a tiny random run checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RUN_ARCH, reference_encoder, write_run
from flexpredict_zoo.checkpoints import CheckpointError
from flexpredict_zoo.encoders import load_encoder
from flexpredict_zoo.train import demo, export


def run_cli(argv):
    return demo.run(demo.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_demo_end_to_end_on_a_run_checkpoint(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", RUN_ARCH, seed=5)  # seed 0 would equal the demo's seeded random init
    out = tmp_path / "demo_out"
    assert run_cli(["--checkpoint", str(run_dir), "--out", str(out), "--draws", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in printed.splitlines()
            if line.startswith(("FlexPredict (pretrained)", "same encoder, random init", "raw pixels"))}
    assert len(rows) == 3 and "1297 train / 500 held-out" in printed

    record = json.loads((out / "results.json").read_text())
    results = record["results"]
    assert results["pretrained"]["dim"] == 32 and results["random_init"]["dim"] == 32 and results["pixels"]["dim"] == 64
    for key, r in results.items():
        for metric in ("knn_top1", "linear_top1", "few_shot_top1"):
            assert 0.0 <= r[metric] <= 100.0
            assert f"{r[metric]:.1f}%" in rows[{"pretrained": "FlexPredict (pretrained)",
                                                "random_init": "same encoder, random init",
                                                "pixels": "raw pixels (8x8 grey values)"}[key]]
    # raw pixels of digits are a strong baseline: k-NN and linear well above 90% (chance is 10%)
    assert results["pixels"]["knn_top1"] > 90 and results["pixels"]["linear_top1"] > 90
    # the run encoder and the seeded random init are different networks, so their scores differ
    assert [results["pretrained"][m] for m in ("knn_top1", "linear_top1", "few_shot_top1")] != \
        [results["random_init"][m] for m in ("knn_top1", "linear_top1", "few_shot_top1")]

    for name, min_size in (("pca_patches.png", (800, 300)), ("retrievals.png", (500, 500))):
        path = out / name
        assert str(path) in printed
        with Image.open(path) as img:
            assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1] and img.mode == "RGB"
            colours = len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0))
        assert colours > 50  # a real picture, not a blank canvas


def test_demo_from_an_export_rebuilds_the_same_random_architecture(tmp_path):
    run_dir = write_run(tmp_path / "run", RUN_ARCH)
    exported = export.export_run(run_dir, tmp_path / "export")
    pretrained, random_init, name = demo.load_models(checkpoint=str(exported), seed=3)
    assert pretrained.embed_dim == random_init.embed_dim == 32 and len(random_init.blocks) == 2
    again = demo.load_models(checkpoint=str(exported), seed=3)[1]
    assert all(torch.equal(a, b) for a, b in zip(random_init.state_dict().values(), again.state_dict().values()))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pretrained(x), reference_encoder(run_dir)(x))


def test_patch_pca_is_an_rgb_map_per_patch(tmp_path):
    model = load_encoder(write_run(tmp_path / "run", RUN_ARCH))
    rgb = demo.patch_pca_rgb(model, torch.randn(4, 3, 32, 32))
    assert rgb.shape == (4, 8, 8, 3) and float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0


def test_missing_pretrained_weights_say_to_pass_a_checkpoint():
    with pytest.raises(CheckpointError, match="no weights tagged 'no_such_weights'.*pass --checkpoint RUN_DIR"):
        demo.load_models("flexpredict_vit_m4_32.no_such_weights")


def test_shipped_digits_model_loads_offline_and_beats_random_init():
    """The weights shipped in the package load through timm (no network), match their recorded sha256, and their
    frozen features beat the same architecture at random initialisation on the held-out digits."""
    from flexpredict_zoo.train.evaluate import extract, few_shot_top1, linear_top1
    from flexpredict_zoo.train.data import DigitsDataset

    pretrained, random_init, _ = demo.load_models(seed=0)  # default: flexpredict_vit_m4_32.digits_stop
    train, heldout = DigitsDataset("train"), DigitsDataset("heldout")
    scores = {}
    for name, model in (("pretrained", pretrained), ("random", random_init)):
        xtr, ytr = extract(model, train)
        xte, yte = extract(model, heldout)
        scores[name] = (linear_top1(xtr, ytr, xte, yte), few_shot_top1(xtr, ytr, xte, yte, shots=5, draws=5))
    # measured margins (3 seeds, see the manifest entry) are several points; 2 points is far outside the noise
    assert scores["pretrained"][0] > scores["random"][0] + 2, scores
    assert scores["pretrained"][1] > scores["random"][1] + 2, scores


def test_shipped_weights_with_a_wrong_recorded_sha256_are_refused(monkeypatch):
    import timm
    from flexpredict_zoo import ChecksumError, manifest

    entry = manifest.weight_entry("flexpredict_vit_m4_32.digits_stop")
    bad = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setattr(manifest, "weight_entry", lambda name: bad)
    with pytest.raises(ChecksumError, match="expected 0000"):
        timm.create_model("flexpredict_vit_m4_32.digits_stop", pretrained=True)
