"""Training logs: the progress line (through `logging`), RUN_DIR/log.csv, and TensorBoard when installed."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from flexpredict_zoo.atomic_write import disk_full_error, is_disk_full, write_file_atomically

LOGGER_NAME = "flexpredict_zoo.train"
logger = logging.getLogger(LOGGER_NAME)

CSV_FIELDS = ("iteration", "epoch", "loss", "loss_last", "lr", "weight_decay", "momentum", "images_per_second",
              "memory_gb", "elapsed_s")


class _RunLogHandler(logging.FileHandler):
    """RUN_DIR/train.log. On a full disk it stops writing quietly (the same lines still reach stderr, and the
    run's own error says what happened) instead of printing logging's traceback for every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if error is not None and is_disk_full(error):
            return
        super().handleError(record)


def setup_logging(run_dir: Optional[Path], is_main: bool, rank: int = 0) -> logging.Logger:
    """Rank 0 logs INFO to stderr and RUN_DIR/train.log; other ranks only warnings, tagged with their rank."""
    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        if getattr(handler, "_flexpredict", False):
            log.removeHandler(handler)
            handler.close()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if is_main and run_dir is not None:
        handlers.append(_RunLogHandler(Path(run_dir) / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._flexpredict = True
        log.addHandler(handler)
    return log


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPUs, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20)
    except ImportError:  # Windows
        return float("nan")


def format_progress(row: Dict[str, Any], total: int) -> str:
    return (f"iter {row['iteration']}/{total} epoch {row['epoch']} loss {row['loss']:.5f} lr {row['lr']:.3e} "
            f"wd {row['weight_decay']:.4f} momentum {row['momentum']:.6f} images/s {row['images_per_second']:.1f} "
            f"mem {row['memory_gb']:.2f} GB")


def read_log_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a log.csv whose iteration parses (a row cut short by a crash or a full disk is left out)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if None in row or None in row.values():  # cut short (or two rows run together) by a crash
                continue
            try:
                int(float(row.get("iteration") or ""))
                float(row.get("elapsed_s") or "nan")
            except (ValueError, OverflowError):  # OverflowError: an "inf" iteration
                continue
            rows.append(row)
    return rows


class MetricsLog:
    """Appends one row per progress line to log.csv and mirrors it to TensorBoard. A run that resumes from the
    checkpoint of iteration `start_iteration` keeps the rows up to it and drops the later ones (those iterations
    are trained again), so log.csv holds each iteration once; `last_elapsed_s` is the kept rows' training time."""

    def __init__(self, run_dir: Path, enabled: bool = True, start_iteration: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.csv"
        self.last_elapsed_s = 0.0
        self._file = None
        self._writer = None
        self._tb = None
        if not enabled:
            return
        kept = [row for row in read_log_rows(self.path) if int(float(row["iteration"])) <= start_iteration] \
            if self.path.is_file() else []
        if kept:
            self.last_elapsed_s = float(kept[-1].get("elapsed_s") or 0.0)

        def write(temporary: Path) -> None:
            with open(temporary, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        write_file_atomically(self.path, write)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            SummaryWriter = None
        if SummaryWriter is not None:
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._writer.writerow({k: row.get(k) for k in CSV_FIELDS})
            self._file.flush()
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error(self.path, f"the row of iteration {row['iteration']} in {self.path}") from None
            raise
        if self._tb is not None:
            for key in ("loss", "lr", "weight_decay", "momentum", "images_per_second", "memory_gb"):
                self._tb.add_scalar(f"train/{key}", row[key], row["iteration"])

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as error:  # the row a full disk refused is flushed again here: already reported
                if not is_disk_full(error):
                    raise
        if self._tb is not None:
            self._tb.close()
            self._tb = None
