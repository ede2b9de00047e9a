"""flexpredict_zoo.convert: official checkpoint -> timm folder (model.safetensors + config.json)."""
from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
from safetensors import safe_open

import flexpredict_zoo  # noqa: F401  (registers the models)
from conftest import build_hf_cache, make_official_checkpoint
from flexpredict_zoo.checkpoints import CheckpointError, CheckpointMismatchError
from flexpredict_zoo.convert import convert_checkpoint, infer_architecture, read_export

SMALL = dict(embed_dim=64, depth=2, num_heads=2)  # not a manifest architecture: needs model_name + kwargs


@pytest.fixture
def converted(tmp_path, official_checkpoint):
    path, ckpt = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "export")
    return path, ckpt, out


def _outputs(model, seed=0, size=224):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_folder_contents_and_metadata(converted):
    path, ckpt, out = converted
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config, metadata = read_export(out)
    assert config["architecture"] == "flexpredict_vit_ti16"
    assert config["num_classes"] == 0 and config["num_features"] == 192
    for source_key in ("file", "hf_hub_id", "hf_hub_filename", "custom_load", "url"):
        assert source_key not in config["pretrained_cfg"]
    assert metadata["encoder"] == config["encoder"] == "target_encoder"
    assert metadata["source_file"] == path.name
    assert metadata["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("blocks.0.attn.qkv.weight")
    assert "pos_embed" not in keys  # fixed sin-cos: regenerated, never stored
    assert len(keys) == 4 + 12 * 12
    assert torch.equal(qkv, ckpt["target_encoder"]["module.blocks.0.attn.qkv.weight"])


def test_local_dir_equals_original_checkpoint(converted):
    path, _, out = converted
    reference = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    exported = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert type(exported).__name__ == "FlexPredictViT"
    ref, got = _outputs(reference), _outputs(exported)
    assert got.shape == (2, 196, 192)
    assert torch.equal(got, ref)
    random = timm.create_model("flexpredict_vit_ti16", pretrained=False)
    assert (_outputs(random) - ref).abs().max() > 1e-2  # the comparison can tell weights apart


@pytest.mark.parametrize("as_file", [False, True])
def test_pretrained_cfg_overlay_file(converted, as_file):
    path, _, out = converted
    target = out / "model.safetensors" if as_file else out
    model = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(target)))
    reference = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(_outputs(model, seed=1), _outputs(reference, seed=1))


def test_hf_hub_name_from_local_cache(converted, hf_cache):
    path, _, out = converted
    build_hf_cache(hf_cache, "someorg/flexpredict-ti16",
                   {"config.json": out / "config.json", "model.safetensors": out / "model.safetensors"})
    model = timm.create_model("hf-hub:someorg/flexpredict-ti16", pretrained=True)
    assert model.pretrained_cfg["hf_hub_id"] == "someorg/flexpredict-ti16"
    reference = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(_outputs(model, seed=2), _outputs(reference, seed=2))


def test_context_encoder(tmp_path, official_checkpoint):
    path, ckpt = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "ctx", encoder="context")
    config, metadata = read_export(out)
    assert metadata["encoder"] == config["encoder"] == "encoder"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        norm = f.get_tensor("norm.weight")
    assert torch.equal(norm, ckpt["encoder"]["module.norm.weight"])
    assert not torch.equal(norm, ckpt["target_encoder"]["module.norm.weight"])
    with pytest.raises(ValueError, match="'target'.*'context'"):
        convert_checkpoint(path, tmp_path / "bad", encoder="ema")


def test_safetensors_and_state_dict_inputs_round_trip(converted, tmp_path):
    _, ckpt, out = converted
    again = convert_checkpoint(out / "model.safetensors", tmp_path / "again")
    state = {k[len("module."):]: v for k, v in ckpt["target_encoder"].items()}
    from_dict = convert_checkpoint(state, tmp_path / "from_dict")
    with safe_open(str(out / "model.safetensors"), framework="pt") as a, \
            safe_open(str(again / "model.safetensors"), framework="pt") as b, \
            safe_open(str(from_dict / "model.safetensors"), framework="pt") as c:
        assert set(a.keys()) == set(b.keys()) == set(c.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)) and torch.equal(a.get_tensor(k), c.get_tensor(k))
    assert read_export(from_dict)[1]["source_file"] == "<state dict>"


def test_infers_micro_architecture(tmp_path):
    path = tmp_path / "m4.pth.tar"
    make_official_checkpoint(path, arch=dict(embed_dim=128, depth=4, num_heads=4, patch_size=4, img_size=32))
    found = infer_architecture({k[7:]: v for k, v in torch.load(path, weights_only=True)["target_encoder"].items()})
    assert (found.embed_dim, found.depth, found.patch_size, found.mlp_ratio, found.img_size) == (128, 4, 4, 4.0, 32)
    out = convert_checkpoint(path, tmp_path / "m4")
    assert json.loads((out / "config.json").read_text())["architecture"] == "flexpredict_vit_m4_32"
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert _outputs(model, size=32).shape == (2, 64, 128)


def test_unknown_architecture_names_what_was_found(tmp_path):
    path = tmp_path / "odd.pth.tar"
    make_official_checkpoint(path, arch=dict(embed_dim=256, depth=3, num_heads=4))
    with pytest.raises(CheckpointError, match=r"embed_dim 256, depth 3, patch 16, mlp_ratio 4, img_size 224"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explicit_model_that_does_not_fit(tmp_path, official_checkpoint):
    path, _ = official_checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed\.proj\.weight: file \(192, 3, 16, 16\) vs model "
                                                      r"\(384, 3, 16, 16\)"):
        convert_checkpoint(path, tmp_path / "out", model_name="flexpredict_vit_s16")
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_output(tmp_path, official_checkpoint, monkeypatch):
    path, _ = official_checkpoint
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temp folder left


def test_existing_output_needs_overwrite(converted):
    path, _, out = converted
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already holds"):
        convert_checkpoint(path, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    convert_checkpoint(path, out, encoder="context", overwrite=True)
    assert read_export(out)[1]["encoder"] == "encoder"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_read_export_rejects_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        read_export(tmp_path)


def test_config_of_released_model_carries_tag_metadata():
    from flexpredict_zoo.convert import export_config
    model = timm.create_model("flexpredict_vit_b16", pretrained=False, **SMALL)
    config = export_config(model, "flexpredict_vit_b16", "encoder")
    cfg = config["pretrained_cfg"]
    assert cfg["license"] == "cc-by-nc-4.0"
    assert "context encoder" in cfg["description"]
    assert config["encoder"] == "encoder"  # a key of its own
    assert not any(str(note).startswith("encoder=") for note in cfg.get("notes", []))
    assert config["num_features"] == 64
    assert "hf_hub_id" not in cfg and "hf_hub_filename" not in cfg


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("timm_native", [False, True])
def test_same_input_same_bytes(tmp_path, official_checkpoint, timm_native):
    # safetensors writes its metadata in hash-map order, different on every call: three conversions of one file
    # had three sha256 before the header was sorted
    path, _ = official_checkpoint
    digests = [_digests(convert_checkpoint(path, tmp_path / f"out{i}", timm_native=timm_native)) for i in range(3)]
    assert digests[0] == digests[1] == digests[2]
    assert sorted(digests[0]) == ["config.json", "model.safetensors"]


def test_second_process_converting_into_the_same_folder_is_refused(tmp_path, official_checkpoint, capsys):
    from conftest import lock_held_by_another_process
    from flexpredict_zoo.cli import main
    from flexpredict_zoo.locks import OutputInUseError, lock_path_beside

    path, _ = official_checkpoint
    out = tmp_path / "export"
    with lock_held_by_another_process(lock_path_beside(out), out, "conversion") as pid:
        with pytest.raises(OutputInUseError, match=f"{out} is in use: process {pid} on "):
            convert_checkpoint(path, out)
        assert main(["convert", str(path), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {out} is in use: process {pid} on ") and "wait for that" in error
    assert not out.exists()
    convert_checkpoint(path, out)  # the other process is gone: the folder is free
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
