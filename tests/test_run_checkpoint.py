"""train/run_checkpoint.py: exact resume, atomic writes, weights_only loading, starting from an official checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_official_checkpoint
from flexpredict_zoo.train import run_checkpoint
from flexpredict_zoo.train.config import from_dict
from flexpredict_zoo.train.engine import Trainer, train
from flexpredict_zoo.train.run_checkpoint import ResumeError, atomic_save, load_checkpoint


def tiny(run_dir, **run):
    return from_dict({
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 2, "embed_dim": 64}},
        "predictor": {"depth": 1, "embed_dim": 32, "num_heads": 4},
        "mask": {"min_keep": 4},
        # 16 images / batch 4 = 4 iterations per epoch: a resume at 3 is mid-epoch and the run crosses an epoch
        "data": {"dataset": "synthetic", "synthetic_size": 16, "batch_size": 4, "num_workers": 0},
        "optim": {"epochs": 3, "warmup_epochs": 1, "lr_peak": 1e-3},
        "run": dict({"output_dir": str(run_dir), "log_every": 3, "checkpoint_every": 3, "device": "cpu"}, **run),
    })


def write_image_folder(folder, count=12):
    """Small JPEG and PNG files of different sizes and contents, in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        size = (40 + 4 * (i % 5), 32 + 6 * (i % 3))
        pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size, Image.BILINEAR)  # smooth: crops and blur change it visibly
        target = folder / f"class_{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"img_{i:02d}.{'jpg' if i % 3 else 'png'}")
    return folder


def folder_run(run_dir, root, **run):
    """The user's conditions: an image folder, the official augmentations (DataConfig defaults), 2 workers.
    12 images / batch 4 = 3 iterations per epoch."""
    return from_dict({
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 2, "embed_dim": 64}},
        "predictor": {"depth": 1, "embed_dim": 32, "num_heads": 4},
        "mask": {"min_keep": 4},
        "data": {"dataset": "folder", "root": str(root), "batch_size": 4, "num_workers": 2},
        "optim": {"epochs": 3, "warmup_epochs": 1, "lr_peak": 1e-3},
        "run": dict({"output_dir": str(run_dir), "log_every": 1, "checkpoint_every": 100, "device": "cpu"}, **run),
    })


def test_resume_with_workers_and_augmentations_continues_the_same_trajectory(tmp_path):
    root = write_image_folder(tmp_path / "images")
    assert folder_run(tmp_path / "x", root).data.grayscale_p == 0.2  # the official augmentations are on
    straight = train(folder_run(tmp_path / "a", root, max_steps=7))
    # stopped at 2 (mid-epoch 0) and at 5 (mid-epoch 1); the resumed runs cross the epoch boundaries at 3 and 6
    parts = [train(folder_run(tmp_path / "b", root, max_steps=steps)) for steps in (2, 5, 7)]
    assert [p["steps_this_run"] for p in parts] == [2, 3, 2] and parts[2]["resumed_from"].endswith("latest.pt")
    assert len(straight["losses"]) == 7 and len(set(straight["losses"])) == 7
    assert parts[0]["losses"] + parts[1]["losses"] + parts[2]["losses"] == straight["losses"]  # bit-identical
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert a["iteration"] == b["iteration"] == 7 and a["epoch"] == b["epoch"] == 2
    compared = 0
    for key in ("encoder", "target_encoder", "predictor"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
            compared += 1
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert compared > 30
    assert a["mask_generator"]["counter"] == b["mask_generator"]["counter"] == 7
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 7 and log[0].startswith("iteration,")  # one header, rows from all three runs


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    train(tiny(tmp_path / "r", max_steps=3))
    folder = tmp_path / "r" / "checkpoints"
    ckpt = torch.load(folder / "latest.pt", weights_only=True)
    for key in ("encoder", "target_encoder", "predictor", "optimizer", "scaler", "iteration", "epoch", "model_name",
                "model_kwargs", "config", "rng", "sampler", "mask_generator", "loss"):
        assert key in ckpt, key
    assert ckpt["model_name"] == "flexpredict_vit_m4_32" and ckpt["model_kwargs"]["img_size"] == 32
    assert ckpt["sampler"] == {"epoch": 0, "batches_done": 3, "iterations_per_epoch": 4, "batch_size": 4,
                               "world_size": 1, "seed": 0}
    assert not any(k.startswith("module.") for k in ckpt["encoder"])
    assert ckpt["config"]["optim"]["lr_peak"] == 1e-3
    assert (folder / "iter_0000003.pt").read_bytes() == (folder / "latest.pt").read_bytes()  # final one kept
    assert (folder / "iter_0000003.pt").stat().st_ino == (folder / "latest.pt").stat().st_ino  # a hard link
    assert sorted(p.name for p in folder.iterdir()) == ["iter_0000003.pt", "latest.pt"]  # no temporary left
    assert (tmp_path / "r" / "config.yaml").is_file()


def test_crash_during_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    atomic_save({"iteration": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(run_checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match=f"no space left on device at {tmp_path}: .*latest.pt was not written"):
        atomic_save({"iteration": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["iteration"] == 1


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = run_checkpoint.rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    run_checkpoint.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


ARCH = dict(embed_dim=64, depth=2, num_heads=4, patch_size=4, img_size=32)


def test_init_from_official_checkpoint_strict(tmp_path):
    path = tmp_path / "official.pth.tar"
    official = make_official_checkpoint(path, arch=ARCH)  # module. keys, predictor depth 2 at width 384
    cfg = tiny(tmp_path / "run", init_from=str(path))
    cfg.predictor.depth, cfg.predictor.embed_dim = 2, 384
    trainer = Trainer(cfg)
    for key, module in trainer.model.networks().items():
        state = module.state_dict()
        for name, value in official[key].items():
            name = name[len("module."):]
            if name == "pos_embed":  # fixed sin-cos, regenerated, not loaded
                continue
            assert torch.equal(state[name], value), (key, name)
    assert trainer.init_info["epoch"] == 600

    cfg.predictor.depth = 1  # a predictor that does not fit: a clear error, never a partial load
    with pytest.raises(ResumeError, match="`predictor` does not fit"):
        Trainer(cfg)


def test_resume_errors(tmp_path):
    with pytest.raises(ResumeError, match="run.resume=true but .*latest.pt does not exist"):
        run_checkpoint.find_resume_checkpoint(tmp_path, True)
    assert run_checkpoint.find_resume_checkpoint(tmp_path, "auto") is None
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    # A web page saved under the checkpoint's name: the message must never pass on torch's advice to retry with
    # weights_only=False (that would run whatever the file holds).
    (tmp_path / "page.html").write_text("<!DOCTYPE html><html><body>Not found</body></html>\n")
    with pytest.raises(ResumeError, match="cannot read checkpoint") as e:
        load_checkpoint(tmp_path / "page.html")
    assert "weights_only" not in str(e.value) and str(tmp_path / "page.html") in str(e.value)
