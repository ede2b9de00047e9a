"""locks.output_lock: one process per output, the second told who holds it; a killed holder never blocks.
locks.claim_output: that lock, then the output's stale temporaries removed, then an existing output refused."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexpredict_zoo.locks import OutputInUseError, claim_output, lock_path_beside, output_lock, read_holder

HOLD = """
import sys, time
from flexpredict_zoo.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2], "extraction"):
    print("held", flush=True)
    time.sleep(60)
"""


def _start_holder(lock_file: Path, output: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file), str(output)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_with_the_holders_name_and_a_killed_holder_frees_it(tmp_path):
    output = tmp_path / "features.safetensors"
    lock_file = lock_path_beside(output)
    assert lock_file == tmp_path / ".features.safetensors.lock"
    holder = _start_holder(lock_file, output)
    try:
        with pytest.raises(OutputInUseError) as caught:
            with output_lock(lock_file, output, "extraction"):
                pytest.fail("the lock of a living holder was taken")
        message = str(caught.value)
        assert f"process {holder.pid} on " in message and str(output) in message
        assert "-c" in message and "wait for that extraction to finish" in message
        assert read_holder(lock_file)["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock must not stay held
        holder.wait()
    with output_lock(lock_file, output):
        assert read_holder(lock_file)["pid"] == os.getpid()
    assert not lock_file.exists()  # released and removed


def test_a_lock_file_removed_by_its_holder_is_not_locked_twice(tmp_path, monkeypatch):
    # two processes opened the same lock file; the first releases (and removes) it; the second then locks the
    # removed inode and must retry on the current file, else a third process could hold the lock at the same time
    lock_file = tmp_path / ".out.lock"
    import flexpredict_zoo.locks as locks
    real_open = open
    opened = []

    def open_then_replace(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if Path(path) == lock_file and not opened:
            opened.append(1)
            os.unlink(lock_file)  # what a releasing holder does right after our open
        return handle

    monkeypatch.setattr(locks, "open", open_then_replace, raising=False)
    with output_lock(lock_file, tmp_path / "out"):
        assert lock_file.exists() and read_holder(lock_file)["pid"] == os.getpid()
    assert len(opened) == 1


def test_one_process_shares_its_lock_and_releases_it_with_the_last_holder(tmp_path):
    lock_file, output = tmp_path / ".lock", tmp_path / "run"
    first = output_lock(lock_file, output)
    first.__enter__()
    with output_lock(lock_file, output):  # a second Trainer of the same run in one notebook
        pass
    assert lock_file.exists()  # still held by the first
    second = output_lock(lock_file, output)
    second.__enter__()
    first.__exit__(None, None, None)  # released out of order: still held by the second
    with pytest.raises(OutputInUseError):
        with _refused_in_child(lock_file, output):
            pass
    second.__exit__(None, None, None)
    assert not lock_file.exists()


CHILD = """
import sys
from flexpredict_zoo.locks import OutputInUseError, output_lock
try:
    with output_lock(sys.argv[1], sys.argv[2]):
        print("took it")
except OutputInUseError as e:
    print("refused", e)
"""


class _refused_in_child:
    """Raises OutputInUseError on entry if a separate process is refused the lock."""

    def __init__(self, lock_file, output):
        self.args = [str(lock_file), str(output)]

    def __enter__(self):
        out = subprocess.run([sys.executable, "-c", CHILD, *self.args], capture_output=True, text=True).stdout
        if out.startswith("refused"):
            raise OutputInUseError(out)
        return self

    def __exit__(self, *exc):
        return False


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / ".lock", tmp_path / "run"):
        pass
    assert "this file system has no file locks" in caplog.text


FORKING_HOLDER = """
import os, sys, time
from flexpredict_zoo.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    if os.fork() == 0:  # a DataLoader worker: lives on for a while after its parent is killed
        time.sleep(30)
        os._exit(0)
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    lock_file, output = tmp_path / ".lock", tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(lock_file), str(output)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)  # the child (same session) is still alive
        holder.wait()
        with output_lock(lock_file, output):  # free at once, not when the child exits
            pass
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)


def test_claim_output_locks_cleans_only_its_own_temporaries_and_refuses_what_exists(tmp_path):
    out = tmp_path / "plot.png"
    stale = tmp_path / ".plot.png.k3j2h1g0.tmp"  # a killed write_file_atomically of this output
    sibling = tmp_path / ".plot.png.v2.ab12cd34.tmp"  # the live temporary of another output, plot.png.v2
    stale.write_bytes(b"x")
    sibling.write_bytes(b"y")
    with claim_output(out, "plot") as claimed:
        assert claimed == out and not stale.exists() and sibling.exists()
        assert read_holder(lock_path_beside(out))["pid"] == os.getpid()
        with pytest.raises(OutputInUseError, match=f"plot.png is in use: process {os.getpid()} on "):
            with _refused_in_child(lock_path_beside(out), out):
                pass
        out.write_bytes(b"png")
    assert not lock_path_beside(out).exists()
    with pytest.raises(FileExistsError) as caught:
        with claim_output(out, "plot"):
            pytest.fail("an existing output was not refused")
    assert str(caught.value) == f"{out} exists; pass --overwrite to replace it or choose another --out"
    assert not lock_path_beside(out).exists()  # released on the refusal too
    with claim_output(out, "plot", overwrite=True):
        pass

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"model already holds config.json; pass --overwrite"):
        with claim_output(folder, "export", names=["model.safetensors", "config.json"]):
            pass
    with claim_output(folder, "export", names=["model.safetensors"]):
        pass
    with claim_output(folder, "export", names=()):  # only the lock and the cleanup
        pass


def test_a_claim_that_fails_leaves_no_folder_it_made(tmp_path):
    from flexpredict_zoo.locks import claim_output
    out = tmp_path / "new" / "deeper" / "plot.png"
    with pytest.raises(RuntimeError, match="drawing failed"):
        with claim_output(out, "plot"):
            assert out.parent.is_dir()  # the lock file lives beside the output
            raise RuntimeError("drawing failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with claim_output(out, "plot"):
        out.write_text("done")
    assert out.read_text() == "done"
