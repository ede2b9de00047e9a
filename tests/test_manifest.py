"""weights_manifest.json is the single source of truth: timm registration and pretrained cfgs come from it."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

import flexpredict_zoo  # registers the models
from flexpredict_zoo import manifest
from flexpredict_zoo.manifest import ManifestError, UnknownModelError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_official_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO_ROOT / "weights_manifest.json").read_text())
MODELS = MANIFEST["models"]
PACKAGE_DIR = Path(flexpredict_zoo.__file__).parent


def _build_wheel(out_dir: Path) -> Path:
    """Build the project's wheel (what `pip install` installs) from a copy of the sources, offline."""
    pytest.importorskip("setuptools.build_meta")
    src = out_dir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "weights_manifest.json"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("flexpredict_zoo", "train"):  # symlinks stay links, as in a checkout
        shutil.copytree(REPO_ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir / "dist")], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir / "dist" / proc.stdout.strip().splitlines()[-1]


def test_package_manifest_is_the_repository_file(tmp_path):
    # One file, not two copies that drift: the package's manifest is a link to the repository's...
    link = REPO_ROOT / "flexpredict_zoo" / "weights_manifest.json"
    assert link.is_symlink() and os.readlink(link) == "../weights_manifest.json"
    # ...and what pip installs holds that file's bytes (a wheel cannot hold a link), with the shipped weights whose
    # sha256 the manifest records.
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        assert wheel.read("flexpredict_zoo/weights_manifest.json") == (REPO_ROOT / "weights_manifest.json").read_bytes()
        shipped = [w for m in MODELS.values() for w in m["weights"] if "package_file" in w["source"]]
        assert shipped
        for w in shipped:
            data = wheel.read(f"flexpredict_zoo/{w['source']['package_file']}")
            assert hashlib.sha256(data).hexdigest() == w["sha256"]
    assert manifest.load_manifest() == MANIFEST


def test_every_model_is_registered():
    assert manifest.model_names() == list(MODELS)
    registered = set(timm.list_models("flexpredict*"))
    assert registered == set(MODELS)
    for name in MODELS:
        assert timm.is_model(name)


# The pretrained cfgs as read by hand from weights_manifest.json (not rebuilt with the code's own logic).
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0, crop_mode="center",
                interpolation="bilinear", num_classes=0, classifier="head", first_conv="patch_embed.proj",
                fixed_input_size=True, paper_ids="arXiv:2308.00566", license=None, notes=None,
                hf_hub_id=None, hf_hub_filename=None, file=None)
_STOP = "amirbar1/StoP"
_IN1K = ("dataset=ImageNet-1k", "epochs=600", "noise_std=0.25")
EXPECTED_CFGS = {
    "flexpredict_vit_ti16": dict(IMAGENET, input_size=(3, 224, 224)),
    "flexpredict_vit_s16": dict(IMAGENET, input_size=(3, 224, 224)),
    **{f"flexpredict_vit_b16.{tag}": dict(IMAGENET, input_size=(3, 224, 224), license="cc-by-nc-4.0",
                                          hf_hub_id=_STOP, hf_hub_filename="vit-b16.pth.tar",
                                          notes=_IN1K + ("predictor_depth=6",))
       for tag in ("stop_in1k", "stop_in1k_context")},
    **{f"flexpredict_vit_l16.{tag}": dict(IMAGENET, input_size=(3, 224, 224), license="cc-by-nc-4.0",
                                          hf_hub_id=_STOP, hf_hub_filename="vit-l16.pth.tar",
                                          notes=_IN1K + ("predictor_depth=12",))
       for tag in ("stop_in1k", "stop_in1k_context")},
    **{f"flexpredict_vit_h16.{tag}": dict(IMAGENET, input_size=(3, 224, 224), license="cc-by-nc-4.0",
                                          hf_hub_id=_STOP, hf_hub_filename="vit-h16.pth.tar",
                                          notes=("dataset=ImageNet-1k", "epochs=300", "noise_std=0.2",
                                                 "predictor_depth=12"))
       for tag in ("stop_in1k", "stop_in1k_context")},
    "flexpredict_vit_m4_32.digits_stop": dict(
        IMAGENET, input_size=(3, 32, 32), license="apache-2.0",
        file=str(PACKAGE_DIR / "weights" / "flexpredict_vit_m4_32.digits_stop.safetensors"),
        notes=("dataset=scikit-learn digits (1,297-image training split, 8x8 upsampled to 32x32)", "epochs=150",
               "noise_std=0.25", "predictor_depth=3")),
}


@pytest.mark.parametrize("name", list(EXPECTED_CFGS))
def test_pretrained_cfgs_come_from_the_manifest(name):
    model, _, tag = name.partition(".")
    cfgs = get_arch_pretrained_cfgs(model)
    assert list(cfgs) == [n for n in EXPECTED_CFGS if n.partition(".")[0] == model]  # the first tag is the default
    cfg = cfgs[name].to_dict()
    assert {key: cfg.get(key) for key in EXPECTED_CFGS[name]} == EXPECTED_CFGS[name]
    assert cfg.get("file") is None or Path(cfg["file"]).is_file()
    assert (cfg.get("tag") or "") == tag
    assert cfg["paper_name"] == "Stochastic positional embeddings improve masked image modeling"
    default = next(n for n in EXPECTED_CFGS if n.partition(".")[0] == model)
    assert (get_pretrained_cfg(model).tag or "") == default.partition(".")[2]


def test_every_manifest_entry_has_an_expected_cfg():
    # A new model or tag in the JSON needs its line in EXPECTED_CFGS, read from the JSON by hand.
    in_json = {f"{m}.{w['tag']}" for m, e in MODELS.items() for w in e["weights"]} | \
        {m for m, e in MODELS.items() if not e["weights"]}
    assert in_json == set(EXPECTED_CFGS)


@pytest.mark.parametrize("model", [m for m in MODELS if MODELS[m]["weights"]])
def test_default_tag_is_target_encoder(model):
    assert MODELS[model]["weights"][0]["encoder"] == "target_encoder"
    assert manifest.weight_entry(model).encoder == "target_encoder"
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
