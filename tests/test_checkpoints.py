"""flexpredict_zoo.checkpoints: safe reading, encoder selection, fit checks, corrupt and unsafe files, memory."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import flexpredict_zoo  # noqa: F401
from conftest import make_official_checkpoint
from flexpredict_zoo.checkpoints import (CheckpointError, CheckpointMismatchError, ChecksumError, check_fits,
                                         encoder_state_dict, load_file, resolve_weight_file, sha256_file,
                                         strip_prefix, verify_sha256)

DEPTH2 = dict(embed_dim=192, depth=2, num_heads=3)


def test_load_official_checkpoint(official_checkpoint):
    path, ckpt = official_checkpoint
    loaded = load_file(path)
    assert set(loaded) == set(ckpt)
    key = "module.blocks.3.mlp.fc1.weight"
    assert torch.equal(loaded["target_encoder"][key], ckpt["target_encoder"][key])
    assert loaded["epoch"] == 600 and loaded["scaler"] is None


def test_encoder_state_dict_choice(official_checkpoint):
    path, ckpt = official_checkpoint
    loaded = load_file(path)
    target, context = encoder_state_dict(loaded), encoder_state_dict(loaded, "encoder")
    assert all(not k.startswith("module.") for k in target)
    assert torch.equal(target["norm.weight"], ckpt["target_encoder"]["module.norm.weight"])
    assert torch.equal(context["norm.weight"], ckpt["encoder"]["module.norm.weight"])
    plain = encoder_state_dict({"module.a": torch.ones(1), "meta": "x"})
    assert list(plain) == ["a"]  # a plain state dict passes through, non-tensors dropped
    with pytest.raises(ValueError, match="encoder must be one of"):
        encoder_state_dict(loaded, "predictor")
    with pytest.raises(CheckpointError, match="no 'encoder' entry"):
        encoder_state_dict({"target_encoder": {"module.a": torch.ones(1)}}, "encoder")
    assert strip_prefix({"module.x": 1, "y": 2}) == {"x": 1, "y": 2}


def test_safetensors_and_folder(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert torch.equal(load_file(tmp_path)["a"], tensors["a"])  # a converted folder resolves to its safetensors
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="folder without model.safetensors"):
        resolve_weight_file(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "nope.pth")


def test_sha256(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert sha256_file(f) == digest
    assert verify_sha256(f, digest.upper()) == digest
    assert verify_sha256(f, None) is None
    with pytest.raises(ChecksumError) as info:
        verify_sha256(f, "1" * 64)
    assert (info.value.expected, info.value.actual, info.value.path) == ("1" * 64, digest, str(f))
    assert f"expected {'1' * 64}, got {digest}" in str(info.value) and str(f) in str(info.value)


def test_wider_checkpoint_into_narrower_model(tmp_path):
    # A ViT-L-for-ViT-B mistake in miniature: width 256 weights into a width-192 model.
    path = tmp_path / "wide.pth.tar"
    make_official_checkpoint(path, arch=dict(embed_dim=256, depth=2, num_heads=4))
    with pytest.raises(CheckpointMismatchError) as info:
        timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEPTH2)
    message = str(info.value)
    assert f"the weights in {path} do not fit" in message  # every loading error names the file
    assert "patch_embed.proj.weight: file (256, 3, 16, 16) vs model (192, 3, 16, 16)" in message
    assert "blocks.0.attn.qkv.weight: file (768, 256) vs model (576, 192)" in message
    assert f"{2 + 2 * 12 + 2} shape mismatches" in message  # patch embed, 12 tensors per block, final norm
    assert "flexpredict_vit_l16" in message


def test_deeper_checkpoint_names_unexpected_keys(tmp_path):
    path = tmp_path / "deep.pth.tar"
    make_official_checkpoint(path, arch=dict(DEPTH2, depth=3))
    with pytest.raises(CheckpointMismatchError, match=r"12 unexpected keys:\n    blocks\.2\.norm1\.weight"):
        timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEPTH2)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys:\n    norm\.weight"):
        check_fits({}, {"norm.weight": torch.ones(1), "head.weight": torch.ones(1)})


def test_missing_encoder_entry_names_the_file(tmp_path):
    # The context-encoder tag on a checkpoint that holds only the target encoder.
    path = tmp_path / "target-only.pth.tar"
    ckpt = make_official_checkpoint(path, arch=dict(embed_dim=768, depth=1, num_heads=12))
    torch.save({"target_encoder": ckpt["target_encoder"], "epoch": 1}, path)
    with pytest.raises(CheckpointError) as info:
        timm.create_model("flexpredict_vit_b16.stop_in1k_context", pretrained=True, depth=1,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert f"{path} has no 'encoder' entry; it has ['epoch', 'target_encoder']" in str(info.value)


def _export_folder(folder: Path, model: torch.nn.Module) -> Path:
    """A folder as `flexpredict-zoo convert` writes it (model.safetensors, config.json) for flexpredict_vit_ti16."""
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "flexpredict_vit_ti16", "num_classes": 0, "global_pool": "avg",
        "pretrained_cfg": {"input_size": [3, 224, 224], "num_classes": 0, "classifier": "head",
                           "first_conv": "patch_embed.proj", "fixed_input_size": True}}))
    return folder / "model.safetensors"


def test_mismatch_names_the_file_on_every_load_path(tmp_path):
    wide = timm.create_model("flexpredict_vit_ti16", embed_dim=256, depth=2, num_heads=4)
    weights = _export_folder(tmp_path / "export", wide)
    for name, kwargs in (("flexpredict_vit_ti16", dict(pretrained_cfg_overlay=dict(file=str(weights)))),
                         ("flexpredict_vit_ti16", dict(pretrained_cfg_overlay=dict(file=str(weights.parent)))),
                         (f"local-dir:{weights.parent}", {})):  # timm's own loader, with our filter
        with pytest.raises(CheckpointMismatchError) as info:
            timm.create_model(name, pretrained=True, depth=2, **kwargs)
        assert f"the weights in {weights} do not fit" in str(info.value), name


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    make_official_checkpoint(path, arch=DEPTH2)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 50):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_file(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEPTH2)
    assert str(path) in str(info.value)


def test_corrupt_bytes(tmp_path):
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint.*truncated or corrupt"):
        load_file(garbage)
    header = tmp_path / "header.pth.tar"
    make_official_checkpoint(header, arch=DEPTH2)
    data = bytearray(header.read_bytes())
    data[:64] = b"\xff" * 64
    header.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_file(header)
    bad_st = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 4)}, str(bad_st))
    raw = bytearray(bad_st.read_bytes())
    raw[8:20] = b"not json at!"
    bad_st.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_file(bad_st)


def record_construction(marker: str) -> "SideEffect":
    Path(marker).write_text("constructed")
    return SideEffect(marker)


class SideEffect:
    """Unpickling this calls record_construction, which writes a marker file: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (record_construction, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_objects_is_refused(tmp_path, zip_format):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth.tar"
    state = {"target_encoder": {"module.norm.weight": torch.ones(3)}, "extra": SideEffect(str(marker))}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth\.tar.*other than tensors.*record_construction"):
        load_file(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEPTH2)
    assert not marker.exists()  # the object was never constructed
    torch.load(path, weights_only=False)  # and the test can tell: an unsafe load does construct it
    assert marker.read_text() == "constructed"


PEAK_SCRIPT = textwrap.dedent("""
    import sys, timm, torch, flexpredict_zoo

    def hwm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    kwargs = dict(embed_dim=192, depth=2, num_heads=3)
    timm.create_model("flexpredict_vit_ti16", pretrained=False, **kwargs)  # warm: imports, allocator, model
    before = hwm_bytes()
    model = timm.create_model("flexpredict_vit_ti16", pretrained=True,
                              pretrained_cfg_overlay=dict(file=sys.argv[1]), **kwargs)
    print(hwm_bytes() - before, float(model.norm.weight.detach().sum()))
""")


@pytest.mark.slow
def test_peak_memory_stays_near_encoder_size(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) to read the peak resident set size")
    path = tmp_path / "with-optimizer.pth.tar"
    ckpt = make_official_checkpoint(path, arch=DEPTH2, optimizer_mb=300)
    expected_norm = float(ckpt["target_encoder"]["module.norm.weight"].sum())
    del ckpt
    size = path.stat().st_size
    assert size > 300 * (1 << 20)
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    delta, norm_sum = proc.stdout.split()
    assert abs(float(norm_sum) - expected_norm) < 1e-4  # the weights did load
    print(f"peak RSS increase {int(delta) / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB checkpoint")
    assert int(delta) < size / 3


def test_export_folder_loads_with_in_chans_and_num_classes(tmp_path):
    source = timm.create_model("flexpredict_vit_ti16", **DEPTH2)
    folder = _export_folder(tmp_path / "export", source).parent
    for name, kwargs in (("flexpredict_vit_ti16", dict(pretrained_cfg_overlay=dict(file=str(folder)))),
                         (f"local-dir:{folder}", {})):  # our loader, and timm's own with our filter
        model = timm.create_model(name, pretrained=True, in_chans=1, num_classes=4, **DEPTH2, **kwargs)
        assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True)), name
        assert model.head.weight.shape == (4, 192)
        assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_empty_file_is_named_as_empty_on_every_load_path(tmp_path):
    empty = tmp_path / "vit-b16.pth.tar"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)") as info:
        load_file(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(empty)), **DEPTH2)
    from flexpredict_zoo.convert import convert_checkpoint
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        convert_checkpoint(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, kind", [([1, 2, 3], "list"), (torch.zeros(3), "Tensor"), ((1, 2), "tuple")])
def test_a_file_that_is_no_dict_says_what_it_holds(tmp_path, content, kind):
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"holds a {kind}, not a dict of weights") as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_safetensors_bytes_under_another_name_load_as_safetensors(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    path = tmp_path / "model.pth"
    save_file(state, str(path))
    loaded = load_file(path)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], state[k]) for k in state)


def test_save_safetensors_sorts_the_metadata_so_the_bytes_depend_on_the_input_only(tmp_path):
    from flexpredict_zoo.checkpoints import read_safetensors_header, save_safetensors, sha256_file
    from safetensors import safe_open

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    metadata = {f"key{i}": f"value {i}" for i in (7, 3, 9, 1, 5, 0, 8, 2)}
    metadata["unicode"] = "état\n\"quoted\""  # escapes and non-ASCII keep the header length
    paths = [save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata) for i in range(3)]
    assert len({sha256_file(p) for p in paths}) == 1
    header, start = read_safetensors_header(paths[0])
    assert list(header["__metadata__"]) == sorted(metadata) and start % 8 == 0
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("b"), tensors["b"]) and torch.equal(f.get_tensor("a"), tensors["a"])
