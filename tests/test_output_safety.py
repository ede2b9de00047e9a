"""Single-file extraction: one process per output, a killed save's temporaries removed at the next start;
a corrupt packaged weight file is answered with advice that can fix it (issue 9)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from conftest import lock_held_by_another_process
from flexpredict_zoo import manifest
from flexpredict_zoo.checkpoints import ChecksumError
from flexpredict_zoo.cli import main as zoo_main
from flexpredict_zoo.locks import lock_path_beside

MODEL = "flexpredict_vit_m4_32"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _extract(images: Path, out: Path, *extra: str) -> int:
    return zoo_main(["extract", MODEL, str(images), "--out", str(out), "--device", "cpu", "--no-progress", *extra])


def test_second_extraction_to_the_same_file_is_refused_naming_the_first(images, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    with lock_held_by_another_process(lock_path_beside(out), out, "extraction") as pid:
        assert _extract(images, out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith(f"error: {out} is in use: process {pid} on ") and "wait for that extraction" in err
        assert not out.exists()
    assert _extract(images, out) == 0  # the first one gone (killed): the lock is free
    assert _extract(images, out) == 2  # the existing result is not replaced without --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_a_killed_saves_temporaries_are_removed_and_only_those(images, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    leftovers = [tmp_path / ".features.safetensors.q1w2e3r4.tmp", tmp_path / ".features.safetensors.tmp.999"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)
    others = [tmp_path / ".other.safetensors.q1w2e3r4.tmp", tmp_path / "features.safetensors.tmp",
              tmp_path / ".features.safetensors.bak.zz99yy88.tmp"]  # a sibling output's live temporary
    for path in others:
        path.write_text("not ours")
    assert _extract(images, out) == 0
    assert out.is_file() and not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "not ours" for p in others)


def test_a_corrupt_packaged_weight_file_is_told_to_reinstall_not_to_download(tmp_path, monkeypatch, capsys):
    entry = manifest.weight_entry(f"{MODEL}.digits_stop")
    # a copy of the package's manifest and weights with the packaged file damaged (the installed one is untouched)
    copy = tmp_path / "pkg"
    damaged = copy / entry.source["package_file"]
    damaged.parent.mkdir(parents=True)
    shutil.copy(manifest.manifest_path(), copy / "weights_manifest.json")
    data = bytearray((manifest.manifest_path().parent / entry.source["package_file"]).read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(manifest, "manifest_path", lambda: copy / "weights_manifest.json")
    with pytest.raises(ChecksumError) as caught:
        timm.create_model(f"{MODEL}.digits_stop", pretrained=True, pretrained_cfg_overlay=dict(file=str(damaged)))
    message = str(caught.value)
    assert "reinstall the package" in message and "download" not in message
    assert zoo_main(["download", f"{MODEL}.digits_stop"]) == 2
    err = capsys.readouterr().err
    assert "reinstall the package" in err and "download MODEL --force" not in err


def test_a_full_disk_anywhere_is_one_error_line(capsys):
    import errno
    from flexpredict_zoo.cli import run_command

    def torch_save_on_a_full_disk(_):  # what torch.save raises: the OSError only as the context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert run_command(torch_save_on_a_full_disk, None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on device (RuntimeError: ")


def test_the_same_extraction_gives_the_same_bytes(images, tmp_path):
    # safetensors writes its metadata in hash-map order, different from call to call: the zoo's writer sorts it
    digests = set()
    for i in range(3):
        out = tmp_path / f"f{i}.safetensors"
        assert _extract(images, out, "--patch-tokens") == 0
        digests.add(__import__("hashlib").sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_killed_conversions_temporary_folder_is_removed_and_only_that(tmp_path, capsys):
    from conftest import make_official_checkpoint
    checkpoint = tmp_path / "ti.pth.tar"
    make_official_checkpoint(checkpoint)
    out = tmp_path / "exported"
    leftover = tmp_path / ".exported.k3j2h1g0.tmp"  # what write_folder_atomically leaves when killed
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    other = tmp_path / ".exported.v2.ab12cd34.tmp"  # the live temporary of a sibling output, exported.v2
    other.mkdir()
    assert zoo_main(["convert", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not leftover.exists() and other.is_dir()
