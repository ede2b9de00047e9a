"""A training run folder belongs to one process; a failed start leaves nothing; a killed save's leftovers are
removed at the next start; log.csv after a resume holds each iteration once with the training time continued;
a full disk is one error line that keeps the last good checkpoint (issue 9)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import lock_held_by_another_process, make_official_checkpoint
from flexpredict_zoo.train import cli
from flexpredict_zoo.train.engine import RUN_LOCK

TINY = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "predictor.depth=1", "predictor.embed_dim=16",
        "predictor.num_heads=2", "data.synthetic_size=16", "data.batch_size=4", "run.device=cpu"]


def _train(run: Path, *extra: str) -> int:
    return cli.main(["--config", "tiny_cpu", *TINY, f"run.output_dir={run}", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_second_training_in_the_same_run_folder_is_refused_naming_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with lock_held_by_another_process(run / RUN_LOCK, run, "training run") as pid:
        assert _train(run, "run.max_steps=1") == 2
        line = _one_error_line(capsys)
        # it touched nothing: no checkpoint, no log, no config; only the first process's lock is there
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]
    assert f"{run} is in use: process {pid} on " in line and "wait for that training run to finish" in line


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path, capsys):
    official = tmp_path / "vit-l.pth.tar"
    make_official_checkpoint(official, arch=dict(embed_dim=64, depth=2, num_heads=2, patch_size=4, img_size=32))
    run = tmp_path / "new-run"
    assert _train(run, f"run.init_from={official}", "run.max_steps=1") == 2
    line = _one_error_line(capsys)
    assert f"run.init_from={official}: `encoder` does not fit the configured model" in line
    assert "shape mismatches (first: " in line and len(line) < 600  # not torch's key-by-key listing
    assert not run.exists()
    existing = tmp_path / "existing"  # a folder the user made is never removed
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert _train(existing, f"run.init_from={official}", "run.max_steps=1") == 2
    assert (existing / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start_and_only_those(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "run.max_steps=1") == 0
    ckpts = run / "checkpoints"
    leftovers = [ckpts / ".latest.pt.k2j4_x9q.tmp", ckpts / ".latest.pt.tmp.4242", ckpts / ".iter_0000004.pt.ab12cd34.tmp",
                 run / ".log.csv.zz11yy22.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    foreign = [ckpts / ".notes.tmp", run / "mine.tmp", ckpts / ".latest.pt.bak",
               ckpts / ".latest.pt.bak.ab12cd34.tmp"]  # the live temporary of another output, latest.pt.bak
    for path in foreign:
        path.write_text("not ours")
    assert _train(run, "run.max_steps=2") == 0
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "not ours" for p in foreign)
    assert "removed 4 temporary file(s) left by a stopped run" in capsys.readouterr().err


def _rows(run: Path):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_log_after_resume_holds_each_iteration_once_and_continues_the_time(tmp_path):
    run = tmp_path / "run"
    # 4 iterations, a checkpoint kept at 2; then resume from that checkpoint (as after a crash at iteration 4)
    assert _train(run, "run.max_steps=4", "run.log_every=1", "run.checkpoint_every=2", "run.keep_every=2") == 0
    first = _rows(run)
    assert [int(r["iteration"]) for r in first] == [1, 2, 3, 4]
    assert _train(run, "run.max_steps=4", "run.log_every=1",
                  f"run.resume={run / 'checkpoints' / 'iter_0000002.pt'}") == 0
    rows = _rows(run)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # 3 and 4 once: the ones trained again
    assert rows[:2] == first[:2]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1]  # continued from the checkpoint, not from 0
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["elapsed_s"] >= elapsed[-1]


# ------------------------------------------------------------------------------------------------ full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs the right to mount: root outside a locked-down container)."""
    where = tmp_path / "disk"
    where.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root, or not allowed in this container)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: this process may still hold train.log


def test_full_disk_during_training_keeps_the_last_checkpoint_and_says_where(small_disk, capsys):
    run = small_disk / "run"
    # TINY's checkpoint is ~350 KB: the first fits, then the disk is filled to 200 KB below what a save needs
    args = ["--config", "tiny_cpu", *TINY, f"run.output_dir={run}", "run.checkpoint_every=1", "run.log_every=1"]
    assert cli.main([*args, "run.max_steps=1"]) == 0
    latest = run / "checkpoints" / "latest.pt"
    good = latest.read_bytes()
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(free - 200_000, 0))  # 200 KB left: less than one more checkpoint
    capsys.readouterr()
    assert cli.main([*args, "run.max_steps=3"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: no space left on device at {run / 'checkpoints'}: ") and "was not written" in line
    assert latest.read_bytes() == good  # the last good state
    # no temporary left; iter_0000001.pt is the first run's final checkpoint (a hard link of latest.pt)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000001.pt", "latest.pt"]
    filler.unlink()
    assert cli.main([*args, "run.max_steps=3"]) == 0  # room again: it resumes from the kept checkpoint
    assert torch.load(latest, weights_only=True)["iteration"] == 3


def test_full_disk_during_extraction_is_one_line_and_leaves_nothing(small_disk, tmp_path, capsys):
    from PIL import Image
    import numpy as np
    from flexpredict_zoo.cli import main as zoo_main
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (small_disk / "filler").write_bytes(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
                                                  - 40_000))
    out = small_disk / "features.safetensors"
    assert zoo_main(["extract", "flexpredict_vit_m4_32", str(images), "--out", str(out), "--patch-tokens",
                     "--device", "cpu", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: no space left on device at {small_disk}: {out} was not written")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_log_csv_is_named_once_and_closing_does_not_hide_it(tmp_path):
    from flexpredict_zoo.atomic_write import DiskFullError
    from flexpredict_zoo.train.logs import CSV_FIELDS, MetricsLog
    log = MetricsLog(tmp_path)
    log._file.close()
    log._file = open("/dev/full", "w", newline="")  # every flush fails with ENOSPC, as on a full disk
    log._writer = csv.DictWriter(log._file, fieldnames=CSV_FIELDS)
    with pytest.raises(DiskFullError, match=r"no space left on device at .*the row of iteration 7 in .*log.csv"):
        log.write({key: 1.0 for key in CSV_FIELDS} | {"iteration": 7})
    log.close()  # the same buffered row fails again on close: already reported, not raised a second time


def test_read_log_rows_leaves_out_rows_cut_short(tmp_path):
    from flexpredict_zoo.train.logs import CSV_FIELDS, read_log_rows
    text = ",".join(CSV_FIELDS) + "\n" + ",".join(["1"] * len(CSV_FIELDS)) + "\n" + "2,0,0.9\n"
    (tmp_path / "log.csv").write_text(text)
    assert [row["iteration"] for row in read_log_rows(tmp_path / "log.csv")] == ["1"]
