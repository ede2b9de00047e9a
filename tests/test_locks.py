"""locks.output_lock: one process per output, the second told who holds it; a killed holder never blocks."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexpredict_zoo.locks import OutputInUseError, lock_path_beside, output_lock, read_holder

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
