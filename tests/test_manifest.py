"""weights_manifest.json is the single source of truth: timm registration and pretrained cfgs come from it."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo import manifest
from flexpredict_zoo.manifest import ManifestError, UnknownModelError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_official_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO_ROOT / "weights_manifest.json").read_text())
MODELS = MANIFEST["models"]


def test_package_manifest_is_the_repository_file():
    assert manifest.manifest_path().read_bytes() == (REPO_ROOT / "weights_manifest.json").read_bytes()
    assert manifest.load_manifest() == MANIFEST


def test_every_model_is_registered():
    assert manifest.model_names() == list(MODELS)
    registered = set(timm.list_models("flexpredict*"))
    assert registered == set(MODELS)
    for name in MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize("model", list(MODELS))
def test_pretrained_cfgs_come_from_the_manifest(model):
    entry = MODELS[model]
    data, weights = entry["data"], entry["weights"]
    cfgs = get_arch_pretrained_cfgs(model)
    expected_tags = [w["tag"] for w in weights] or [""]
    assert [name.partition(".")[2] for name in cfgs] == expected_tags
    for name, cfg in cfgs.items():
        cfg = cfg.to_dict()
        assert cfg["input_size"] == tuple(data["input_size"])
        assert cfg["mean"] == tuple(data["mean"]) and cfg["std"] == tuple(data["std"])
        assert cfg["crop_pct"] == data["crop_pct"] and cfg["crop_mode"] == data["crop_mode"]
        assert cfg["interpolation"] == data["interpolation"]
        assert cfg["num_classes"] == 0 and cfg["classifier"] == "head"
        assert cfg["paper_ids"] == f"arXiv:{MANIFEST['paper']['arxiv']}"
    for w in weights:
        cfg = cfgs[f"{model}.{w['tag']}"].to_dict()
        src = w["source"]
        if "package_file" in src:  # weights shipped inside the package (the embedded demo model)
            assert Path(cfg["file"]) == manifest.manifest_path().parent / src["package_file"]
            assert Path(cfg["file"]).is_file() and cfg["license"] == w["license"]
        else:
            revision = f"@{src['revision']}" if src.get("revision") else ""
            assert cfg["hf_hub_id"] == src["hf_hub_id"] + revision
            assert cfg["hf_hub_filename"] == src["hf_hub_filename"]
            assert cfg["license"] == w["license"] == "cc-by-nc-4.0"
        pretraining = MODELS[model]["pretraining"]
        assert cfg["notes"] == (f"encoder={w['encoder']}", f"dataset={pretraining['dataset']}",
                                f"epochs={pretraining['epochs']}", f"noise_std={pretraining['noise_std']}",
                                f"predictor_depth={pretraining['predictor_depth']}")
    # The first tag is timm's default.
    default = get_pretrained_cfg(model)
    assert (default.tag or "") == expected_tags[0]


@pytest.mark.parametrize("model", [m for m in MODELS if MODELS[m]["weights"]])
def test_default_tag_is_target_encoder(model):
    assert MODELS[model]["weights"][0]["encoder"] == "target_encoder"
    assert manifest.weight_entry(model).encoder == "target_encoder"
    assert get_pretrained_cfg(model).notes[0] == "encoder=target_encoder"
    if any("hf_hub_id" in w["source"] for w in MODELS[model]["weights"]):  # released checkpoints hold both encoders
        assert {w["encoder"] for w in MODELS[model]["weights"]} == {"target_encoder", "encoder"}


def test_released_models_and_tags():
    for model, file in (("flexpredict_vit_b16", "vit-b16.pth.tar"), ("flexpredict_vit_l16", "vit-l16.pth.tar"),
                        ("flexpredict_vit_h16", "vit-h16.pth.tar")):
        entries = manifest.weight_entries(model)
        assert [e.tag for e in entries] == ["stop_in1k", "stop_in1k_context"]
        assert all(e.source["hf_hub_id"] == "amirbar1/StoP" and e.source["hf_hub_filename"] == file for e in entries)
        assert manifest.find_weight_entry("amirbar1/StoP", file).name == f"{model}.stop_in1k"
        assert manifest.find_weight_entry("amirbar1/StoP", file, encoder="encoder").name == f"{model}.stop_in1k_context"
    arch = {m: MODELS[m]["architecture"] for m in ("flexpredict_vit_b16", "flexpredict_vit_l16", "flexpredict_vit_h16")}
    assert [(a["embed_dim"], a["depth"], a["num_heads"], a["patch_size"]) for a in arch.values()] == \
        [(768, 12, 12, 16), (1024, 24, 16, 16), (1280, 32, 16, 16)]


def test_tags_select_the_encoder_of_a_training_checkpoint(tmp_path):
    # A ViT-B-width checkpoint with one block: the default tag must load target_encoder, the context tag encoder.
    path = tmp_path / "vit-b16-depth1.pth.tar"
    ckpt = make_official_checkpoint(path, arch=dict(embed_dim=768, depth=1, num_heads=12))
    for name, key in (("flexpredict_vit_b16", "target_encoder"), ("flexpredict_vit_b16.stop_in1k_context", "encoder")):
        model = timm.create_model(name, depth=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        for param in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.bias"):
            assert torch.equal(model.state_dict()[param], ckpt[key][f"module.{param}"]), (name, param)


def test_entry_lookup_errors():
    with pytest.raises(UnknownModelError) as info:
        manifest.model_entry("flexpredict_vit_b61")
    assert "Did you mean flexpredict_vit_b16" in str(info.value)
    with pytest.raises(UnknownModelError, match=r"its tags are \['stop_in1k', 'stop_in1k_context'\]"):
        manifest.weight_entry("flexpredict_vit_b16.stop_in22k")
    with pytest.raises(UnknownModelError, match="no released weights"):
        manifest.weight_entry("flexpredict_vit_ti16")
    assert manifest.weight_entry("flexpredict_vit_l16.stop_in1k_context").encoder == "encoder"
    assert manifest.find_weight_entry("someone/else", "vit-b16.pth.tar") is None


def _write(tmp_path, data) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def _b16(data):
    return data["models"]["flexpredict_vit_b16"]


@pytest.mark.parametrize("where, mutate, valid", [
    ("weights", lambda d: _b16(d)["weights"][0].update(encodr="target_encoder"), "'encoder'"),
    ("weights source", lambda d: _b16(d)["weights"][0]["source"].update(hf_hub_file="x"), "'hf_hub_filename'"),
    ("model", lambda d: _b16(d).update(weigths=[]), "'weights'"),
    ("data", lambda d: _b16(d)["data"].update(crop_pc=0.9), "'crop_pct'"),
])
def test_unknown_keys_name_the_valid_keys(tmp_path, where, mutate, valid):
    data = copy.deepcopy(MANIFEST)
    mutate(data)
    with pytest.raises(ManifestError) as info:
        manifest.load_manifest(_write(tmp_path, data))
    message = str(info.value)
    assert "flexpredict_vit_b16" in message and "unknown key" in message and valid in message


def test_other_validation_errors(tmp_path):
    data = copy.deepcopy(MANIFEST)
    del _b16(data)["architecture"]["num_heads"]
    with pytest.raises(ManifestError, match=r"exactly the keys \['depth', 'embed_dim', 'img_size', 'mlp_ratio', "
                                            r"'num_heads', 'patch_size'\]"):
        manifest.load_manifest(_write(tmp_path, data))
    data = copy.deepcopy(MANIFEST)
    _b16(data)["weights"][1]["tag"] = "stop_in1k"
    with pytest.raises(ManifestError, match="duplicate tag 'stop_in1k'"):
        manifest.load_manifest(_write(tmp_path, data))
    data = copy.deepcopy(MANIFEST)
    _b16(data)["weights"][0]["encoder"] = "ema"
    with pytest.raises(ManifestError, match="encoder must be 'target_encoder' or 'encoder'"):
        manifest.load_manifest(_write(tmp_path, data))
    data = dict(copy.deepcopy(MANIFEST), format_version=2)
    with pytest.raises(ManifestError, match="format_version 2; expected 1"):
        manifest.load_manifest(_write(tmp_path, data))
    assert manifest.load_manifest(_write(tmp_path, MANIFEST)) == MANIFEST
