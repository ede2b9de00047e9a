"""flexpredict_zoo.encoders: one loader for run folders, checkpoints, exports, official checkpoints, names, hub/dir."""
from __future__ import annotations

import pytest
import timm
import torch

import flexpredict_zoo  # noqa: F401  (registers the models)
from conftest import RUN_ARCH, RUN_MODEL, make_official_checkpoint, reference_encoder, write_run
from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import CheckpointError
from flexpredict_zoo.convert import convert_checkpoint
from flexpredict_zoo.encoders import load_encoder, resolve_encoder


def _same(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_run_folder_and_checkpoint_file_target_and_context(tmp_path):
    run_dir = write_run(tmp_path / "run")
    for encoder, key in ((None, "target_encoder"), ("target", "target_encoder"), ("context", "encoder")):
        loaded = resolve_encoder(run_dir, encoder)
        assert not loaded.model.training and loaded.architecture == RUN_MODEL
        assert loaded.model_kwargs == dict(RUN_ARCH, img_size=32)  # drop_path_rate is training-only
        assert loaded.description == f"{RUN_MODEL} (run)"
        assert _same(loaded.model, reference_encoder(run_dir, key))
        assert _same(load_encoder(run_dir / "checkpoints" / "latest.pt", encoder), loaded.model)
    assert not _same(load_encoder(run_dir, "target"), load_encoder(run_dir, "context"))
    torch.manual_seed(0)
    random = resolve_encoder(run_dir).random_init()
    assert len(random.blocks) == 2 and random.embed_dim == 32 and not _same(random, load_encoder(run_dir))


def test_official_checkpoint_and_converted_folder(tmp_path, official_checkpoint):
    path, _ = official_checkpoint
    by_shapes = resolve_encoder(path)  # the architecture is read off the tensor shapes
    assert by_shapes.architecture == "flexpredict_vit_ti16"
    reference = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert _same(by_shapes.model, reference, size=224)
    out = convert_checkpoint(path, tmp_path / "converted", encoder="context")
    context = load_encoder(path, "context")
    assert _same(load_encoder(out), context, size=224) and _same(load_encoder(out / "model.safetensors"), context, 224)
    assert not _same(context, by_shapes.model, size=224)
    with pytest.raises(CheckpointError, match="holds the encoder only"):
        load_encoder(out, "target")
    # a model name with weights= for the file
    named = load_encoder("flexpredict_vit_ti16", weights=path, encoder="context")
    assert _same(named, context, size=224)


def test_names_tags_and_encoders():
    default = resolve_encoder("flexpredict_vit_m4_32")  # the shipped demo weights (the default tag)
    assert default.description == "flexpredict_vit_m4_32" and default.model.pretrained_cfg["tag"] == "digits_stop"
    assert _same(default.model, timm.create_model("flexpredict_vit_m4_32.digits_stop", pretrained=True).eval())
    with pytest.raises(CheckpointError, match="is the target_encoder, not the encoder"):
        load_encoder("flexpredict_vit_m4_32", "context")  # no released tag holds its context encoder
    random = load_encoder("flexpredict_vit_m4_32", pretrained=False, model_kwargs=dict(depth=1))
    assert len(random.blocks) == 1
    assert isinstance(load_encoder("resnet18", pretrained=False), torch.nn.Module)  # any timm name


def test_local_dir_and_hub(tmp_path, hf_cache):
    from conftest import build_hf_cache
    from flexpredict_zoo.train.export import export_run
    run_dir = write_run(tmp_path / "run")
    out = export_run(run_dir, tmp_path / "export")
    local = resolve_encoder(f"local-dir:{out}")
    assert local.architecture == RUN_MODEL and local.model_kwargs == dict(RUN_ARCH, img_size=32)
    build_hf_cache(hf_cache, "me/tiny", {"config.json": out / "config.json", "model.safetensors": out / "model.safetensors"})
    hub = resolve_encoder("hf-hub:me/tiny")
    assert hub.model_kwargs == local.model_kwargs
    for model in (local.model, hub.model):
        assert _same(model, reference_encoder(run_dir))


def test_errors_say_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="neither a training run folder"):
        load_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist; pass a run folder"):
        load_encoder(str(tmp_path / "nothing.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a flexpredict-train checkpoint nor FlexPredict encoder weights"):
        load_encoder(tmp_path / "other.pt")
    with pytest.raises(manifest.UnknownModelError, match="Did you mean flexpredict_vit_b16"):
        load_encoder("flexpredict_vit_b61")
    with pytest.raises(manifest.UnknownModelError, match="no weights tagged 'nope'.*run folder"):
        load_encoder("flexpredict_vit_m4_32.nope")
    with pytest.raises(manifest.UnknownModelError, match="flexpredict_vit_ti16 has no released weights"):
        load_encoder("flexpredict_vit_ti16")
    with pytest.raises(ValueError, match="'target'.*'context'"):
        load_encoder("flexpredict_vit_m4_32", "ema")
    with pytest.raises(FileNotFoundError, match="weight file .*w.safetensors does not exist"):
        load_encoder("flexpredict_vit_m4_32", weights=tmp_path / "w.safetensors")
    make_official_checkpoint(tmp_path / "b.pth.tar", arch=dict(embed_dim=96, depth=2, num_heads=2))
    with pytest.raises(CheckpointError, match="embed_dim 96, depth 2"):
        load_encoder(tmp_path / "b.pth.tar")
