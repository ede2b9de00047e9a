"""flexpredict_zoo.push: what would be uploaded, and the card that goes with it (HfApi patched, no network)."""
from __future__ import annotations

import fnmatch
import hashlib
import json

import pytest
from huggingface_hub import HfApi

from conftest import lock_held_by_another_process
from flexpredict_zoo.checkpoints import CheckpointError
from flexpredict_zoo.convert import convert_checkpoint
from flexpredict_zoo.locks import OutputInUseError, lock_path_beside
from flexpredict_zoo.push import push_to_hub


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        from pathlib import Path
        files = sorted(p.name for p in Path(folder_path).iterdir() if p.is_file()
                       and any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns))
        card = (Path(folder_path) / "README.md").read_text()
        config = json.loads((Path(folder_path) / "config.json").read_text())
        calls.append(("upload_folder", repo_id, dict(kwargs, files=files, card=card, config=config,
                                                     folder=Path(folder_path))))
        return "commit-info"

    for name, fn in dict(create_repo=create_repo, create_branch=create_branch, upload_folder=upload_folder).items():
        monkeypatch.setattr(HfApi, name, fn)
    return calls


def test_push_uploads_export_and_card(tmp_path, official_checkpoint, fake_hub):
    path, _ = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "export")
    (out / "notes.txt").write_text("private scratch")  # not part of the export: must not be uploaded
    assert push_to_hub(out, "me/flexpredict-ti16", private=True, commit_message="first") == "commit-info"
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[0][2]["private"] is True and fake_hub[0][2]["exist_ok"] is True
    upload = fake_hub[1][2]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert upload["commit_message"] == "first" and upload["revision"] is None
    card = upload["card"]
    assert card.startswith("---\n") and "library_name: timm" in card
    assert 'timm.create_model("hf-hub:me/flexpredict-ti16", pretrained=True)' in card
    assert path.name in card and "target_encoder" in card and "2308.00566" in card
    import hashlib
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card


def test_push_to_revision_creates_branch(tmp_path, official_checkpoint, fake_hub):
    path, _ = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "export", encoder="context")
    push_to_hub(out, "me/x", revision="v1")
    assert [c[0] for c in fake_hub] == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub[1][2]["branch"] == "v1" and fake_hub[2][2]["revision"] == "v1"
    assert "`encoder`" in fake_hub[2][2]["card"]


def test_push_refuses_bad_input(tmp_path, fake_hub):
    with pytest.raises(ValueError, match="ORG/NAME"):
        push_to_hub(tmp_path, "no-org")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        push_to_hub(tmp_path, "me/x")
    assert fake_hub == []


def test_push_timm_native_uploads_a_native_copy_and_leaves_the_folder_as_it_is(tmp_path, official_checkpoint,
                                                                               fake_hub):
    path, _ = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "export")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    push_to_hub(out, "me/native", timm_native=True)
    upload = fake_hub[-1][2]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"] and upload["folder"] != out
    assert upload["config"]["architecture"] == "vit_tiny_patch16_224"
    assert upload["config"]["flexpredict"]["architecture"] == "flexpredict_vit_ti16"
    card = upload["card"]
    assert "import timm  # stock timm is enough" in card and "import timm, flexpredict_zoo" not in card
    assert "timm-native" in card and path.name in card  # the source record travels with the copy
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    assert not upload["folder"].exists()  # the temporary copy is gone


def test_push_of_a_folder_another_process_writes_is_refused(tmp_path, official_checkpoint, fake_hub):
    path, _ = official_checkpoint
    out = convert_checkpoint(path, tmp_path / "export")
    with lock_held_by_another_process(lock_path_beside(out), out, "export") as pid:
        with pytest.raises(OutputInUseError, match=f"export is in use: process {pid} on .* export` since"):
            push_to_hub(out, "me/x")
    assert fake_hub == [] and not (out / "README.md").exists()
    push_to_hub(out, "me/x")  # the holder is gone: the lock is free again
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
