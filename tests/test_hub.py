"""The Hub path: released weights through a local Hugging Face cache (HF_HUB_OFFLINE=1), tags, revisions, errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import flexpredict_zoo  # noqa: F401
from conftest import build_hf_cache, make_official_checkpoint
from flexpredict_zoo import manifest
from flexpredict_zoo import vision_transformer as vt
from flexpredict_zoo.checkpoints import ChecksumError, sha256_file
from flexpredict_zoo.hub import WeightsNotAvailableError, download, split_revision

# The released model names with a tiny width/depth, so the real tags, manifest and Hub path are exercised cheaply.
SMALL_B16 = dict(embed_dim=64, depth=2, num_heads=2)


def _unprefixed(state):
    return {k[len("module."):]: v for k, v in state.items() if k != "module.pos_embed"}


@pytest.fixture
def released_b16(tmp_path):
    """A tiny checkpoint in the official format, named as the released ViT-B/16 file."""
    path = tmp_path / "vit-b16.pth.tar"
    return path, make_official_checkpoint(path, arch=SMALL_B16)


def _assert_loaded(model, state):
    got = model.state_dict()
    for key, value in _unprefixed(state).items():
        assert torch.equal(got[key], value), key


def test_split_revision():
    assert split_revision("amirbar1/StoP@abc123") == ("amirbar1/StoP", "abc123")
    assert split_revision("amirbar1/StoP") == ("amirbar1/StoP", None)


def test_download_from_env_cache(tmp_path, hf_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    commit = build_hf_cache(hf_cache, "org/repo", {"w.bin": f})
    path = download("org/repo", "w.bin")
    assert path == hf_cache / "models--org--repo" / "snapshots" / commit / "w.bin"
    assert path.read_bytes() == b"weights"
    with pytest.raises(WeightsNotAvailableError, match=r"other\.bin.*org/repo.*flexpredict-zoo download"):
        download("org/repo", "other.bin")


def test_default_tag_loads_target_encoder_from_env_cache(hf_cache, released_b16):
    path, ckpt = released_b16
    build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": path})
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16)
    assert model.pretrained_cfg["tag"] == "stop_in1k"
    _assert_loaded(model, ckpt["target_encoder"])
    context = timm.create_model("flexpredict_vit_b16.stop_in1k_context", pretrained=True, **SMALL_B16)
    _assert_loaded(context, ckpt["encoder"])
    diff = (model.state_dict()["norm.weight"] - context.state_dict()["norm.weight"]).abs().max()
    assert diff > 1e-3  # the two tags really are different tensors


def test_cache_dir_argument(tmp_path, released_b16):
    path, ckpt = released_b16
    cache = tmp_path / "my_cache"
    build_hf_cache(cache, "amirbar1/StoP", {"vit-b16.pth.tar": path})
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, cache_dir=cache, **SMALL_B16)
    _assert_loaded(model, ckpt["target_encoder"])


def test_revision_pinning(tmp_path, hf_cache):
    old, new = tmp_path / "old.pth.tar", tmp_path / "new.pth.tar"
    old_ckpt = make_official_checkpoint(old, arch=SMALL_B16, seed=1)
    new_ckpt = make_official_checkpoint(new, arch=SMALL_B16, seed=2)
    pinned = build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": old}, revision="a" * 40)
    build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": new}, revision="b" * 40)  # main -> bbb...
    latest = timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16)
    _assert_loaded(latest, new_ckpt["target_encoder"])
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16,
                              pretrained_cfg_overlay=dict(hf_hub_id=f"amirbar1/StoP@{pinned}"))
    _assert_loaded(model, old_ckpt["target_encoder"])


def test_num_classes_adds_fresh_head(hf_cache, released_b16):
    path, ckpt = released_b16
    build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": path})
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, num_classes=10, **SMALL_B16).eval()
    assert model.head.weight.shape == (10, 64)
    _assert_loaded(model, ckpt["target_encoder"])
    backbone = timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), backbone(x), atol=1e-6)


def test_sha256_mismatch_refuses_file_before_building(hf_cache, released_b16, monkeypatch):
    path, _ = released_b16
    build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": path})
    patched = copy.deepcopy(manifest.load_manifest())
    patched["models"]["flexpredict_vit_b16"]["weights"][0]["sha256"] = "0" * 64
    monkeypatch.setattr(manifest, "load_manifest", lambda p=None: patched)
    built = []
    original = vt.build_model_with_cfg
    monkeypatch.setattr(vt, "build_model_with_cfg", lambda *a, **k: built.append(1) or original(*a, **k))
    with pytest.raises(ChecksumError) as info:
        timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16)
    actual = sha256_file(path)
    message = str(info.value)
    assert f"expected {'0' * 64}, got {actual}" in message and "vit-b16.pth.tar" in message
    assert info.value.actual == actual and "models--amirbar1--StoP" in info.value.path
    assert built == []  # the model was never built from the bad file
    patched["models"]["flexpredict_vit_b16"]["weights"][0]["sha256"] = actual
    timm.create_model("flexpredict_vit_b16", pretrained=True, **SMALL_B16)
    assert built == [1]


def test_no_network_nothing_cached(hf_cache):
    with pytest.raises(WeightsNotAvailableError) as info:
        timm.create_model("flexpredict_vit_l16", pretrained=True)
    message = str(info.value)
    assert "vit-l16.pth.tar" in message and "amirbar1/StoP" in message
    assert "`flexpredict-zoo download MODEL`" in message and "pretrained_cfg_overlay=dict(file=PATH)" in message


def test_in_chans_and_num_classes_through_the_hub(hf_cache, released_b16):
    # The released file through the Hub cache gets timm's load-time adaptations, with its sha256 still checked.
    path, ckpt = released_b16
    build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": path})
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, in_chans=1, num_classes=3, **SMALL_B16)
    proj = ckpt["target_encoder"]["module.patch_embed.proj.weight"]
    assert torch.equal(model.patch_embed.proj.weight, proj.sum(1, keepdim=True))  # timm's adapt_input_conv
    assert model.head.weight.shape == (3, 64) and model.in_chans == 1
    assert torch.equal(model.state_dict()["norm.weight"], ckpt["target_encoder"]["module.norm.weight"])
