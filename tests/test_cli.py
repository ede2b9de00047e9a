"""flexpredict_zoo.cli: list / info / download / convert / push, and errors as one `error:` line with exit code 2."""
from __future__ import annotations

import copy
import hashlib
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi

from conftest import build_hf_cache, make_official_checkpoint
from flexpredict_zoo import manifest
from flexpredict_zoo.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def recorded_sha(monkeypatch):
    """Record a sha256 for flexpredict_vit_b16's default tag in a patched copy of the manifest."""
    def record(digest):
        patched = copy.deepcopy(manifest.load_manifest())
        patched["models"]["flexpredict_vit_b16"]["weights"][0]["sha256"] = digest
        monkeypatch.setattr(manifest, "load_manifest", lambda path=None: patched)
    return record


@pytest.fixture
def cached_b16(tmp_path, hf_cache):
    data = tmp_path / "vit-b16.pth.tar"
    data.write_bytes(b"released checkpoint bytes " * 100)
    commit = build_hf_cache(hf_cache, "amirbar1/StoP", {"vit-b16.pth.tar": data})
    return data, commit


def test_list(capsys, recorded_sha):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in manifest.model_names():
        assert name in out
    assert "flexpredict_vit_b16.stop_in1k (default)  encoder=target_encoder" in out
    assert "source=hf-hub:amirbar1/StoP/vit-l16.pth.tar  license=cc-by-nc-4.0  sha256=not recorded" in out
    assert out.count("sha256=not recorded") == 6
    recorded_sha("ef" * 32)
    code, out, _ = run(capsys, "list")
    assert f"sha256={'ef' * 32}" in out and out.count("sha256=not recorded") == 5


def test_info(capsys):
    code, out, _ = run(capsys, "info", "flexpredict_vit_b16")
    assert code == 0
    assert "embed 768, depth 12, heads 12, patch 16" in out
    assert "in1k_linear_top1_last_layer: 72.6" in out and "in1k_1pct_top1: 60.3" in out
    assert "flexpredict-train --config train/configs/vit_b16.yaml" in out
    assert "stop_in1k_context: encoder=encoder" in out and "arXiv 2308.00566" in out
    code, out, _ = run(capsys, "info", "flexpredict_vit_b16.stop_in1k_context")
    assert "stop_in1k_context" in out and "flexpredict_vit_b16.stop_in1k:" not in out
    code, out, _ = run(capsys, "info", "flexpredict_vit_l16", "--json")
    import json
    assert json.loads(out)["reference_results"]["davis_jf"] == 58.4


def test_unknown_model_is_one_error_line(capsys):
    code, out, err = run(capsys, "info", "flexpredict_vit_b61")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown FlexPredict model 'flexpredict_vit_b61'. Did you mean flexpredict_vit_b16")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(capsys, "info", "flexpredict_vit_b16.in22k")
    assert code == 2 and "its tags are ['stop_in1k', 'stop_in1k_context']" in err


def test_download_prints_path_and_sha256(capsys, cached_b16, hf_cache):
    data, commit = cached_b16
    code, out, err = run(capsys, "download", "flexpredict_vit_b16")
    assert code == 0, err
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    path_line, sha_line = out.splitlines()
    assert path_line.endswith(f"models--amirbar1--StoP/snapshots/{commit}/vit-b16.pth.tar")
    assert sha_line == f"sha256 {digest} (not recorded in the manifest)"


def test_download_revision_and_cache_dir(capsys, tmp_path):
    cache = tmp_path / "elsewhere"
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"old revision")
    new.write_bytes(b"new revision")
    pinned = build_hf_cache(cache, "amirbar1/StoP", {"vit-b16.pth.tar": old}, revision="1" * 40)
    build_hf_cache(cache, "amirbar1/StoP", {"vit-b16.pth.tar": new}, revision="2" * 40)  # refs/main -> 222...
    code, out, _ = run(capsys, "download", "flexpredict_vit_b16", "--cache-dir", str(cache))
    assert code == 0 and hashlib.sha256(b"new revision").hexdigest() in out
    code, out, _ = run(capsys, "download", "flexpredict_vit_b16", "--cache-dir", str(cache), "--revision", pinned)
    assert code == 0 and pinned in out and hashlib.sha256(b"old revision").hexdigest() in out


def test_download_checks_recorded_sha256(capsys, cached_b16, recorded_sha):
    data, _ = cached_b16
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    recorded_sha(digest)
    code, out, _ = run(capsys, "download", "flexpredict_vit_b16")
    assert code == 0 and f"sha256 {digest} (matches the manifest)" in out
    recorded_sha("0" * 64)
    code, out, err = run(capsys, "download", "flexpredict_vit_b16")
    assert code == 2 and out == ""
    assert f"expected {'0' * 64}, got {digest}" in err and "vit-b16.pth.tar" in err


def test_download_errors(capsys, hf_cache):
    code, _, err = run(capsys, "download", "flexpredict_vit_l16")  # nothing cached, offline
    assert code == 2 and "flexpredict-zoo download" in err and "pretrained_cfg_overlay" in err
    code, _, err = run(capsys, "download", "flexpredict_vit_ti16")
    assert code == 2 and "has no released weights" in err


def test_convert_and_push(capsys, tmp_path, official_checkpoint, monkeypatch):
    path, ckpt = official_checkpoint
    out_dir = tmp_path / "export"
    code, out, err = run(capsys, "convert", str(path), "--out", str(out_dir), "--encoder", "context")
    assert code == 0, err
    assert f"wrote {out_dir} (flexpredict_vit_ti16, encoder of {path.name})" in out
    from safetensors.torch import load_file
    assert torch.equal(load_file(out_dir / "model.safetensors")["norm.bias"], ckpt["encoder"]["module.norm.bias"])
    code, _, err = run(capsys, "convert", str(path), "--out", str(out_dir))
    assert code == 2 and "already holds" in err

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    code, out, err = run(capsys, "push", str(out_dir), "--repo-id", "me/ti16", "--private")
    assert code == 0, err
    assert uploads[0]["repo_id"] == "me/ti16" and (out_dir / "README.md").is_file()
    assert 'timm.create_model("hf-hub:me/ti16", pretrained=True)' in out


def test_convert_errors(capsys, tmp_path):
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.pth.tar"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error: weight file") and "does not exist" in err
    odd = tmp_path / "odd.pth.tar"
    make_official_checkpoint(odd, arch=dict(embed_dim=96, depth=2, num_heads=2))
    code, _, err = run(capsys, "convert", str(odd), "--out", str(tmp_path / "o"))
    assert code == 2 and "embed_dim 96, depth 2" in err and "--model NAME" in err
    code, _, err = run(capsys, "convert", str(odd), "--out", str(tmp_path / "o"), "--encoder", "ema")
    assert code == 2 and "invalid choice: 'ema'" in err
    assert not (tmp_path / "o").exists()


def test_push_error(capsys, tmp_path):
    code, _, err = run(capsys, "push", str(tmp_path), "--repo-id", "me/x")
    assert code == 2 and err.startswith("error: ") and "model.safetensors is missing" in err


def test_extract_is_wired(capsys):
    code, out, _ = run(capsys, "extract", "--help")
    assert code == 0 and "--out DIR|FILE.safetensors" in out
    code, _, err = run(capsys, "extract", "flexpredict_vit_ti16")
    assert code == 2 and "--out" in err  # argparse usage error from the extract arguments


def test_console_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "flexpredict_zoo.cli", "info", "vit_b16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown FlexPredict model 'vit_b16'") and "Traceback" not in proc.stderr


MISSING_FILE_COMMANDS = [  # (argv with {m} for a path that does not exist, the start of the one error line)
    (["convert", "{m}/vit-b16.pth.tar", "--out", "{t}/out"], "error: weight file {m}/vit-b16.pth.tar does not exist"),
    (["push", "{m}/export", "--repo-id", "me/x"], "error: {m}/export is not a converted model folder"),
    (["extract", "flexpredict_vit_m4_32", "{m}/images", "--out", "{t}/f.safetensors", "--no-pretrained"],
     "error: input path '{m}/images' does not exist"),
    (["extract", "{m}/run", "{t}/images", "--out", "{t}/f.safetensors"], "error: {m}/run does not exist"),
    (["extract", "flexpredict_vit_m4_32", "{t}/images", "--out", "{t}/f.safetensors", "--checkpoint",
      "{m}/w.safetensors"], "error: weight file {m}/w.safetensors does not exist"),
]


@pytest.mark.parametrize("argv,expected", MISSING_FILE_COMMANDS, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_every_command_answers_a_missing_file_with_one_error_line(capsys, tmp_path, argv, expected):
    from PIL import Image
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "images" / "a.png")
    missing = tmp_path / "missing"
    fill = dict(m=str(missing), t=str(tmp_path))
    code, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith(expected.format(**fill)) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "f.safetensors").exists()
