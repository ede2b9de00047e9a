"""flexpredict_zoo.model_card: MODEL_CARD.md is generated from the manifest and kept in sync."""
from __future__ import annotations

import copy
from pathlib import Path

from flexpredict_zoo.manifest import load_manifest
from flexpredict_zoo.model_card import main, render_hub_card, render_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent
CARD = REPO_ROOT / "MODEL_CARD.md"


def test_committed_card_matches_generator():
    assert CARD.is_file(), "MODEL_CARD.md is missing: run `python -m flexpredict_zoo.model_card`"
    assert CARD.read_text() == render_model_card(), \
        "MODEL_CARD.md differs from weights_manifest.json: run `python -m flexpredict_zoo.model_card` and commit it"


def test_card_holds_manifest_facts():
    manifest = load_manifest()
    text = render_model_card(manifest)
    for name, entry in manifest["models"].items():
        assert f"### `{name}`" in text
        if entry.get("pretraining"):
            assert f"flexpredict-train --config {entry['pretraining']['recipe']}" in text
        for w in entry.get("weights", []):
            assert f"`{w['tag']}`" in text
    b16 = manifest["models"]["flexpredict_vit_b16"]["reference_results"]
    row = next(line for line in text.splitlines() if line.startswith("| ImageNet-1k linear probe, top-1 (last layer)"))
    assert row.split(" | ")[1:] == [f"{b16['in1k_linear_top1_last_layer']:.1f}", "77.1", "79.0 |"]
    assert "arXiv 2308.00566 v2 tables" in text
    assert text.count("not recorded") == 6  # 3 released models x 2 tags, no sha256 recorded yet


def test_card_follows_manifest_changes():
    manifest = copy.deepcopy(load_manifest())
    digest = "ab" * 32
    manifest["models"]["flexpredict_vit_l16"]["weights"][0]["sha256"] = digest
    manifest["models"]["flexpredict_vit_l16"]["reference_results"]["in1k_1pct_top1"] = 66.6
    text = render_model_card(manifest)
    assert f"`{digest}`" in text and text.count("not recorded") == 5
    assert "| ImageNet-1k, 1% labels, top-1 | 60.3 | 66.6 | 65.4 |" in text
    assert text != render_model_card()


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "MODEL_CARD.md"
    assert main(["--check", "--output", str(out)]) == 1  # missing
    assert main(["--output", str(out)]) == 0
    assert main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "edited\n")
    assert main(["--check", "--output", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_hub_card():
    config = {"architecture": "flexpredict_vit_b16", "num_features": 768,
              "pretrained_cfg": {"license": "cc-by-nc-4.0", "description": "ViT-B/16 FlexPredict backbone"}}
    text = render_hub_card(config, {"encoder": "target_encoder", "source_file": "vit-b16.pth.tar",
                                    "source_sha256": "cd" * 32}, "me/flexpredict-b16")
    assert text.startswith("---\nlicense: cc-by-nc-4.0\nlibrary_name: timm\n")
    assert 'timm.create_model("hf-hub:me/flexpredict-b16", pretrained=True)' in text
    assert "cd" * 32 in text and "2308.00566" in text and "`target_encoder`" in text


def test_card_renders_training_and_per_seed_evaluation_of_weights_made_here():
    manifest = copy.deepcopy(load_manifest())
    result = {"knn_top1": 61.25, "linear_top1": 93.0, "few_shot_top1": 60.0}
    manifest["models"]["flexpredict_vit_m4_32"]["weights"] = [{
        "tag": "demo", "encoder": "target_encoder", "description": "test weights",
        "source": {"package_file": "weights/x.safetensors"}, "sha256": "ab" * 32, "license": "apache-2.0",
        "training": {"recipe": "train/configs/digits_m4_32.yaml", "dataset": "digits", "iterations": 1500,
                     "epochs": 75, "batch_size": 64, "seed": 0, "wall_time_min": 17.4, "hardware": "a CPU",
                     "final_loss": 0.02329, "command": "flexpredict-train --config digits_m4_32"},
        "evaluation": {"protocol": "held-out digits", "command": "flexpredict-train demo", "shipped_seed": 0,
                       "seeds": {"0": {"pretrained": result, "random_init": dict(result, knn_top1=50.0),
                                       "pixels": dict(result, knn_top1=97.8)}}},
    }]
    card = render_model_card(manifest)
    assert "1500 iterations (75 epochs), batch 64, seed 0, 17 minutes on a CPU, final loss 0.0233" in card
    assert "| 0 | FlexPredict (pretrained) | 61.2 | 93.0 | 60.0 |" in card
    assert "| 0 | same encoder, random init | 50.0 | 93.0 | 60.0 |" in card
    assert "| 0 | raw pixels | 97.8 | 93.0 | 60.0 |" in card


def test_hub_card_of_a_timm_native_folder_needs_no_plugin_and_says_which_to_choose():
    config = {"architecture": "vit_base_patch16_224", "num_features": 768,
              "flexpredict": {"architecture": "flexpredict_vit_b16", "model_args": {}},
              "pretrained_cfg": {"license": "cc-by-nc-4.0", "description": "ViT-B/16 FlexPredict backbone",
                                 "input_size": [3, 224, 224]}}
    text = render_hub_card(config, {"encoder": "target_encoder"}, "me/b16-native")
    assert "import timm  # stock timm is enough" in text and "import timm, flexpredict_zoo" not in text
    assert "`flexpredict_vit_b16` as timm's own `vit_base_patch16_224`" in text and "at 224x224" in text
    assert "## Which folder" in text and "interpolates the stored embedding" in text
    plugin_config = {k: v for k, v in config.items() if k != "flexpredict"}
    plugin = render_hub_card(dict(plugin_config, architecture="flexpredict_vit_b16"), {"encoder": "target_encoder"},
                             "me/b16")
    assert "import timm, flexpredict_zoo" in plugin and "## Which folder" in plugin
