"""write_model_folder(timm_native=True): a folder stock timm loads without flexpredict_zoo (convert, export, push)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from timm.layers import resample_abs_pos_embed

import flexpredict_zoo  # noqa: F401  (registers the models)
from conftest import RUN_ARCH, reference_encoder, write_run
from flexpredict_zoo.checkpoints import read_safetensors_header, sha256_file
from flexpredict_zoo.cli import main as zoo_main
from flexpredict_zoo.convert import read_export, write_model_folder
from flexpredict_zoo.encoders import load_encoder
from flexpredict_zoo.train import export

# Runs in a fresh interpreter in which flexpredict_zoo cannot be imported at all (sys.modules entry None), so
# anything that reached for the plugin would fail: loads each folder with stock timm, computes patch tokens and
# pooled features of the given inputs at the native size and at another one, and saves them.
STOCK_TIMM = """
import sys
sys.modules["flexpredict_zoo"] = None
import timm, torch
cases = torch.load(sys.argv[1])
out = {}
for folder, case in cases.items():
    for size, images in case.items():
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=size).eval()
        with torch.no_grad():
            tokens = model.forward_features(images)
            out[(folder, size)] = (type(model).__name__, tokens, model.forward_head(tokens))
torch.save(out, sys.argv[2])
assert sys.modules["flexpredict_zoo"] is None and not any(m.startswith("flexpredict_zoo.") for m in sys.modules)
print("no plugin:", timm.__version__)
"""


def _outputs(model: torch.nn.Module, images: torch.Tensor):
    with torch.no_grad():
        tokens = model.eval().forward_features(images)
        return tokens, model.forward_head(tokens)


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run_stock_timm(cases: dict, tmp_path: Path) -> dict:
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", STOCK_TIMM, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("no plugin:")
    return torch.load(tmp_path / "out.pt")


def _plugin_at(model: torch.nn.Module, size: int, interpolate: bool) -> torch.nn.Module:
    """The plugin model with the same weights at another input size: its sin-cos embedding regenerated for the
    new grid, or (`interpolate`) the native one resampled by timm (bicubic), which is what a timm-native folder
    is documented to compute there."""
    resized = timm.create_model(model.pretrained_cfg["architecture"], img_size=size)
    resized.load_state_dict(model.state_dict())
    if interpolate:
        resized.pos_embed.copy_(resample_abs_pos_embed(model.pos_embed, new_size=list(resized.patch_embed.grid_size),
                                                       old_size=list(model.patch_embed.grid_size),
                                                       num_prefix_tokens=0))
    return resized.eval()


def test_stock_timm_without_the_plugin_equals_the_plugin_at_the_native_size(tmp_path):
    torch.manual_seed(0)
    ti16 = timm.create_model("flexpredict_vit_ti16").eval()  # random init, as the issue allows offline
    digits = timm.create_model("flexpredict_vit_m4_32.digits_stop", pretrained=True).eval()  # shipped weights
    folders = {
        "ti16": (write_model_folder(tmp_path / "ti16", ti16, "flexpredict_vit_ti16", "target", timm_native=True),
                 ti16, 224, 320),
        "m4": (write_model_folder(tmp_path / "m4", digits, "flexpredict_vit_m4_32", "target", timm_native=True),
               digits, 32, 48)}
    cases = {str(folder): {native: _images(native), other: _images(other, seed=1)}
             for folder, _, native, other in folders.values()}
    stock = _run_stock_timm(cases, tmp_path)
    for folder, plugin, native, other in folders.values():
        name, tokens, pooled = stock[(str(folder), native)]
        assert name == "VisionTransformer"  # timm's own class, not FlexPredictViT
        ref_tokens, ref_pooled = _outputs(plugin, cases[str(folder)][native])
        assert tokens.shape == ref_tokens.shape and pooled.shape == ref_pooled.shape
        assert (tokens - ref_tokens).abs().max() <= 1e-5 and (pooled - ref_pooled).abs().max() <= 1e-5
        # another size: the plugin regenerates the sin-cos embedding, stock timm interpolates the stored one
        _, tokens, pooled = stock[(str(folder), other)]
        images = cases[str(folder)][other]
        _, exact_pooled = _outputs(_plugin_at(plugin, other, interpolate=False), images)
        assert (pooled - exact_pooled).abs().max() > 1e-2  # documented: not equal away from the native size
        interp_tokens, interp_pooled = _outputs(_plugin_at(plugin, other, interpolate=True), images)
        assert (tokens - interp_tokens).abs().max() <= 1e-5 and (pooled - interp_pooled).abs().max() <= 1e-5


def test_native_folder_records_timm_vit_the_exact_embedding_and_the_flexpredict_model(tmp_path, official_checkpoint):
    path, _ = official_checkpoint
    assert zoo_main(["convert", str(path), "--out", str(tmp_path / "native"), "--timm-native"]) == 0
    out = tmp_path / "native"
    config, metadata = read_export(out)
    assert config["architecture"] == metadata["architecture"] == "vit_tiny_patch16_224"
    args = config["model_args"]
    assert (args["class_token"], args["global_pool"], args["fc_norm"]) == (False, "avg", False)
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"], args["img_size"]) == \
        (192, 12, 3, 16, 224)
    assert config["flexpredict"] == {"architecture": "flexpredict_vit_ti16", "model_args": {}}
    assert metadata["flexpredict_architecture"] == "flexpredict_vit_ti16" and metadata["source_file"] == path.name
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    header, _ = read_safetensors_header(out / "model.safetensors")
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    plugin = timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("pos_embed"), plugin.pos_embed)  # the sin-cos values, bit for bit
        assert len(f.keys()) == len(plugin.state_dict()) + 1
    # the plugin's own tools read a native folder as the FlexPredict model: exact at any size again
    loaded = load_encoder(out)
    assert type(loaded).__name__ == "FlexPredictViT"
    images = _images(320)
    regenerated = _outputs(_plugin_at(plugin, 320, interpolate=False), images)[1]
    assert torch.equal(_outputs(_plugin_at(loaded, 320, interpolate=False), images)[1], regenerated)


def test_export_timm_native_loads_in_timm_with_the_runs_architecture(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    args = export.add_arguments(argparse.ArgumentParser()).parse_args([str(run), "--out", str(tmp_path / "native"),
                                                                        "--timm-native"])
    assert export.run(args) == 0
    assert 'timm.create_model("local-dir:' in capsys.readouterr().out
    out = tmp_path / "native"
    config, _ = read_export(out)
    assert config["architecture"] == "vit_base_patch16_224"  # no timm name has these shapes; model_args do
    assert (config["model_args"]["embed_dim"], config["model_args"]["depth"]) == (RUN_ARCH["embed_dim"], 2)
    assert config["flexpredict"]["architecture"] == "flexpredict_vit_m4_32"
    assert "drop_path_rate" not in config["model_args"]  # training-only arguments are not the architecture
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert type(model).__name__ == "VisionTransformer"
    images = _images(32)
    got, want = _outputs(model, images), _outputs(reference_encoder(run), images)
    assert (got[0] - want[0]).abs().max() <= 1e-5 and (got[1] - want[1]).abs().max() <= 1e-5
    entry = json.loads((out / export.ENTRY_NAME).read_text())
    assert entry["entry"]["sha256"] == sha256_file(out / "model.safetensors")
    # the shipped form of such an entry is the plugin's package file: it loads a native file too
    plugin = timm.create_model(entry["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                               **entry["model_args"])
    assert torch.equal(_outputs(plugin, images)[1], want[1])


@pytest.mark.parametrize("name, timm_name, patch", [("flexpredict_vit_b16", "vit_base_patch16_224", 16),
                                                     ("flexpredict_vit_h16", "vit_huge_patch14_224", 16),
                                                     ("flexpredict_vit_m4_32", "vit_base_patch16_224", 4)])
def test_timm_names_and_arguments(name, timm_name, patch):
    from flexpredict_zoo.convert import timm_native_architecture
    found, args = timm_native_architecture(name)
    assert found == timm_name and args["patch_size"] == patch  # model_args override the name's own patch size
    with torch.device("meta"):
        model = timm.create_model(found, **args)
    assert model.num_prefix_tokens == 0 and model.global_pool == "avg" and model.pos_embed.shape[1] == \
        (args["img_size"] // patch) ** 2
