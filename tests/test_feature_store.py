"""The feature store: rows equal the in-memory extractor's, bounded rows in memory, resume after kill -9, two
processes (torchrun, gloo) equal one, reuse and refusal of a store made otherwise, memory-mapped reading."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo import features
from flexpredict_zoo.feature_store import INDEX_NAME, SHARD_TARGET_BYTES, ShardedArray, shard_file_name
from flexpredict_zoo.features import extract_features, extract_to_store, open_features, save_features

MODEL = "flexpredict_vit_m4_32"  # shipped weights, 32x32 input, 64 patch tokens of width 128
N_GOOD, BAD = 21, ["img007.png", "img015.png"]  # two unreadable files among the inputs
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and spares a shared, loaded machine from oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_images")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD + len(BAD)):
        name = f"img{i:03d}.png"
        if name in BAD:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
        else:
            Image.fromarray(rng.integers(0, 256, size=(36 + i % 5, 40, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def reference(image_dir):
    """The in-memory extractor's rows: what every store must hold."""
    return extract_features(MODEL, image_dir, batch_size=4, device="cpu", patch_tokens=True, layers=[1, 3])


def _cli(*argv: str) -> list:
    return [sys.executable, "-m", "flexpredict_zoo.cli", "extract", *argv]


def _store_args(image_dir: Path, out: Path, *extra: str) -> list:
    return [MODEL, str(image_dir), "--out", str(out), "--shard-size", "4", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--no-progress", "--patch-tokens", "--layers", "1", "3", *extra]


def _run_cli(argv: list) -> str:
    from flexpredict_zoo.cli import main
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def _assert_same_rows(store, result) -> None:
    """Row for row: names, skips, and every array bit for bit (torch.equal)."""
    assert store.names == result.names and store.skipped == result.skipped
    assert torch.equal(store.pooled[:], result.pooled)
    assert torch.equal(store.patch_tokens[:], result.patch_tokens)
    assert sorted(store.intermediates) == sorted(result.intermediates)
    for layer in result.intermediates:
        assert torch.equal(store.intermediates[layer][:], result.intermediates[layer])
        assert torch.equal(store.intermediate_tokens[layer][:], result.intermediate_tokens[layer])


# ---------------------------------------------------------------------------------------------- rows and reading

def test_store_rows_equal_the_in_memory_extractor(image_dir, reference, tmp_path):
    out = tmp_path / "store"
    printed = _run_cli(["extract", *_store_args(image_dir, out)])
    assert f"read {N_GOOD} images, skipped {len(BAD)}" in printed and all(name in printed for name in BAD)
    total = N_GOOD + len(BAD)
    shards = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert shards == [shard_file_name(i) for i in range(-(-total // 4))]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    store = open_features(out)
    assert len(store) == N_GOOD and sorted(name for name, _ in store.skipped) == BAD
    assert all("cannot identify image" in reason for _, reason in store.skipped)
    _assert_same_rows(store, reference)

    index = json.loads((out / INDEX_NAME).read_text())
    assert index["complete"] and index["names"] == reference.names and index["num_inputs"] == total
    assert index["arrays"]["patch_tokens"] == {"shape": [64, 128], "dtype": "float32"}
    assert index["model"] == MODEL and index["layers"] == [1, 3] and index["dtype"] == "float32"
    from flexpredict_zoo import manifest
    assert index["weights_file_sha256"] == manifest.weight_entry(MODEL).sha256
    assert index["versions"]["torch_version"] == torch.__version__
    assert sum(s["rows"] for s in index["shards"]) == N_GOOD
    # Each shard is itself a feature file: the rows of its 4 inputs, readable alone.
    first = open_features(out / shard_file_name(0))
    assert first.names == reference.names[:4] and torch.equal(first.pooled[:], reference.pooled[:4])


def test_reading_across_shards(image_dir, reference, tmp_path):
    store = extract_to_store(MODEL, image_dir, tmp_path / "s", shard_size=3, batch_size=3, device="cpu",
                             patch_tokens=True, layers=[1, 3])
    pooled = store.pooled
    assert isinstance(pooled, ShardedArray) and pooled.shape == (N_GOOD, 128) and pooled.num_shards == 8
    assert isinstance(pooled.shard(0), np.memmap)  # memory-mapped, not read into memory
    rows = [0, 5, 2, 20, -1, 11]
    assert torch.equal(pooled[rows], reference.pooled[rows])
    assert torch.equal(pooled[torch.tensor(rows)], reference.pooled[rows])
    assert torch.equal(pooled[1:9], reference.pooled[1:9])  # crosses shard boundaries
    assert torch.equal(pooled[-3], reference.pooled[-3])
    assert torch.equal(store.patch_tokens[4:6], reference.patch_tokens[4:6])
    assert np.array_equal(np.asarray(pooled), reference.pooled.numpy())
    rows_read = pooled[0:2]
    rows_read += 1  # a copy: neither the file nor later reads change
    assert torch.equal(pooled[0:2], reference.pooled[0:2])
    assert not pooled.shard(0).flags.writeable
    with pytest.raises(IndexError, match="out of range"):
        pooled[[N_GOOD]]
    with pytest.raises(KeyError, match="has no array 'labels'"):
        store["labels"]

    batches = list(store.iter_batches(5, keys=["pooled", "layer_1"]))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 1]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(N_GOOD))
    assert torch.equal(torch.cat([b["layer_1"] for b in batches]), reference.intermediates[1])
    shuffled = list(store.iter_batches(4, keys=["pooled"], shuffle=True, seed=3, drop_last=True))
    order = torch.cat([b["index"] for b in shuffled])
    assert len(shuffled) == N_GOOD // 4 and len(set(order.tolist())) == len(order)
    assert not torch.equal(order, torch.sort(order).values)
    assert torch.equal(torch.cat([b["pooled"] for b in shuffled]), reference.pooled[order])
    again = torch.cat([b["index"] for b in store.iter_batches(4, shuffle=True, seed=3, drop_last=True)])
    assert torch.equal(order, again)


def test_open_a_single_file(reference, tmp_path):
    path = save_features(reference, tmp_path / "f.safetensors")
    store = open_features(path)
    assert len(store) == N_GOOD and store.names == reference.names and store.skipped == reference.skipped
    _assert_same_rows(store, reference)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_features(tmp_path / "nothing")


def test_labelled_dataset_keeps_labels_and_caller_fingerprint(tmp_path):
    """What `flexpredict-train eval` needs: a Dataset of (image, label), labels kept, reuse decided by the
    caller's fingerprint items too."""
    from flexpredict_zoo.features import UnreadableImage

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return 9

        def __getitem__(self, i):
            if i == 4:
                return UnreadableImage("4", "OSError: broken")
            g = torch.Generator().manual_seed(i)
            return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()), 100 + i

    expected = extract_features(MODEL, Digits(), batch_size=4, device="cpu")
    store = extract_to_store(MODEL, Digits(), tmp_path / "d", batch_size=4, shard_size=4, device="cpu",
                             fingerprint={"dataset": "digits", "split": "train"})
    assert store.labels.shape == (8,) and store.labels.dtype == np.int64
    assert torch.equal(store.labels[:], expected.labels) and store.labels[:].tolist()[3:5] == [103, 105]
    assert torch.equal(store.pooled[:], expected.pooled) and store.skipped == [("4", "OSError: broken")]
    reused = extract_to_store(MODEL, Digits(), tmp_path / "d", batch_size=8, device="cpu",
                              fingerprint={"dataset": "digits", "split": "train"})
    assert torch.equal(reused.pooled[:], expected.pooled)
    with pytest.raises(ValueError, match=r"caller.split: store train, now heldout"):
        extract_to_store(MODEL, Digits(), tmp_path / "d", device="cpu",
                         fingerprint={"dataset": "digits", "split": "heldout"})


# ------------------------------------------------------------------------------------------------ bounded memory

def test_never_more_than_one_shard_of_rows_in_memory(image_dir, tmp_path, monkeypatch):
    """Rows computed but not yet written never exceed one shard, and the row buffers are one shard long."""
    events, buffer_rows = [], set()  # +images per forward, -rows per shard written; rows of the buffers
    encode, save = features.encode_batch, features.save_features

    def counting_encode(model, images, *args, **kwargs):
        events.append(len(images))
        return encode(model, images, *args, **kwargs)

    def counting_save(result, path, metadata=None):
        events.append(-len(result.names))
        for rows in (result.pooled, result.patch_tokens):  # the memory behind the rows written
            buffer_rows.add(rows.untyped_storage().nbytes() // (rows[0].numel() * rows.element_size()))
        return save(result, path, metadata)

    monkeypatch.setattr(features, "encode_batch", counting_encode)
    monkeypatch.setattr(features, "save_features", counting_save)
    store = extract_to_store(MODEL, image_dir, tmp_path / "m", shard_size=6, batch_size=2, device="cpu",
                             patch_tokens=True)
    assert len(store) == N_GOOD and events[0] == 1  # the first forward: one blank image, for the row shapes
    outstanding = np.cumsum(events[1:])
    assert outstanding[-1] == 0 and outstanding.min() >= 0
    assert 4 <= outstanding.max() <= 6  # one shard at most (6 inputs, of which some may be unreadable)
    assert buffer_rows == {6}  # the row buffers are one shard long


def test_default_shard_size_is_a_few_hundred_megabytes():
    shapes = {"pooled": (768,), "patch_tokens": (196, 768)}  # ViT-B/16 with patch tokens: ~600 KB a row
    size = features._default_shard_size(shapes, labelled=False, batch_size=64)
    assert size % 64 == 0 and 0.75 * SHARD_TARGET_BYTES <= size * 4 * 768 * 197 <= SHARD_TARGET_BYTES
    assert features._default_shard_size({"pooled": (768,)}, labelled=True, batch_size=64) > 80_000


# ------------------------------------------------------------------------------------------ resume, reuse, refuse

SLOW_RUN = """
import sys, time
import flexpredict_zoo.features as features
encode = features.encode_batch
def slow(*args, **kwargs):
    time.sleep(0.3)  # slow enough to be killed midway
    return encode(*args, **kwargs)
features.encode_batch = slow
from flexpredict_zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_midway_then_rerun_gives_the_rows_of_an_uninterrupted_run(image_dir, reference, tmp_path):
    out = tmp_path / "killed"
    argv = ["extract", *_store_args(image_dir, out)]
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / shard_file_name(0)).is_file():
        assert process.poll() is None and time.time() < deadline, "the extraction ended before its first shard"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 1 <= len(done) < 6 and not json.loads((out / INDEX_NAME).read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        open_features(out)
    kept = {name: (out / name).stat().st_ino for name in done}

    printed = _run_cli(argv)
    assert f"resuming {out}: {len(done)} of 6 shards already complete" in printed
    assert {name: (out / name).stat().st_ino for name in done} == kept  # complete shards are not redone
    assert not list(out.glob(".*.tmp"))  # the killed run's temporary file is gone
    _assert_same_rows(open_features(out), reference)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    printed = _run_cli(argv)
    assert "already complete (21 rows in 6 shards); nothing to do" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_store_made_otherwise_is_never_mixed_with(image_dir, tmp_path):
    out = tmp_path / "store"
    extract_to_store(MODEL, image_dir, out, shard_size=8, device="cpu")
    cases = [(dict(pretrained=False), "weights_sha256"), (dict(patch_tokens=True), "options.patch_tokens"),
             (dict(layers=[2]), "options.layers"), (dict(shard_size=4), "shard_size: store 8, now 4"),
             (dict(dtype="bf16"), "options.dtype: store float32, now bfloat16")]
    for kwargs, difference in cases:
        with pytest.raises(ValueError, match=f"other settings.*{difference}"):
            extract_to_store(MODEL, image_dir, out, **{"device": "cpu", **kwargs})
    with pytest.raises(ValueError, match="inputs.count: store 23, now 22"):
        extract_to_store(MODEL, sorted(image_dir.iterdir())[1:], out, device="cpu")
    from conftest import lock_held_by_another_process
    from flexpredict_zoo.feature_store import LOCK_NAME, StoreInUseError
    with lock_held_by_another_process(out / LOCK_NAME, out, "extraction") as pid:  # refused at once, not mixed
        with pytest.raises(StoreInUseError, match=rf"is in use: process {pid} on .* is writing it.*wait for that extraction"):
            extract_to_store(MODEL, image_dir, out, shard_size=8, device="cpu")
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["complete"] and index["shard_size"] == 8  # untouched by the refused runs
    remade = extract_to_store(MODEL, image_dir, out, shard_size=4, device="cpu", patch_tokens=True, overwrite=True)
    assert remade.patch_tokens is not None and len(list(out.glob("shard-*"))) == 6


def test_checked_before_the_work(image_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(features, "_write_shards", lambda *a, **k: calls.append(1))  # the work
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no feature store"):
        extract_to_store(MODEL, image_dir, tmp_path / "other", device="cpu")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]  # left as it was
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write to the output folder"):
        extract_to_store(MODEL, image_dir, tmp_path / "file" / "store", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_to_store(MODEL, tmp_path / "missing", tmp_path / "s", device="cpu")
    from flexpredict_zoo.manifest import UnknownModelError
    with pytest.raises(UnknownModelError):
        extract_to_store("flexpredict_vit_m4_23", image_dir, tmp_path / "s", device="cpu")
    assert calls == [] and not (tmp_path / "s" / INDEX_NAME).exists()
    monkeypatch.undo()
    foreign = tmp_path / "foreign"
    extract_to_store(MODEL, image_dir, foreign, shard_size=4, device="cpu")
    index = json.loads((foreign / INDEX_NAME).read_text())
    (foreign / INDEX_NAME).write_text(json.dumps({**index, "complete": False}))
    shutil.copy(foreign / shard_file_name(1), foreign / shard_file_name(2))
    with pytest.raises(ValueError, match="does not belong to the store"):
        extract_to_store(MODEL, image_dir, foreign, shard_size=4, device="cpu")


def test_single_file_output_stays(image_dir, tmp_path):
    from flexpredict_zoo.features import load_features
    out = tmp_path / "one.safetensors"
    _run_cli(["extract", MODEL, str(image_dir), "--out", str(out), "--workers", "0", "--no-progress"])
    assert load_features(out).names == open_features(out).names and len(open_features(out)) == N_GOOD
    from flexpredict_zoo.cli import main
    assert main(["extract", MODEL, str(image_dir), "--out", str(tmp_path / "two.safetensors"),
                 "--shard-size", "3"]) == 2


# ------------------------------------------------------------------------------------------------- two processes

def test_two_processes_under_torchrun_equal_one(image_dir, reference, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): shards dealt to ranks, one store, rows equal a single process's
    (`reference`; a one-process store holds the same rows: test_store_rows_equal_the_in_memory_extractor)."""
    both = tmp_path / "both"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "flexpredict_zoo.cli",
                                "extract", *_store_args(image_dir, both)], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.count("read 21 images, skipped 2") == 1  # rank 0 reports
    index = json.loads((both / INDEX_NAME).read_text())
    assert index["run"]["world_size"] == 2 and index["complete"]
    from flexpredict_zoo.feature_store import read_safetensors_header
    writers = [read_safetensors_header(both / shard["file"])[0]["__metadata__"]["rank"] for shard in index["shards"]]
    assert writers == ["0", "1", "0", "1", "0", "1"]  # shard k written by rank k mod 2
    _assert_same_rows(open_features(both), reference)
