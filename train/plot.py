"""A run at a glance: `flexpredict-train plot RUN_DIR [RUN_DIR...] --out FILE.png`.

Reads RUN_DIR/log.csv (written by `logs.MetricsLog`, columns `logs.CSV_FIELDS`) and draws loss (raw and smoothed),
learning rate, weight decay, EMA momentum, images/s and memory against the iteration, several runs overlaid. A
resumed run is one line: where a log holds the iterations since the resumed checkpoint twice (versions that
appended on resume), the reader keeps the resumed rows. Needs matplotlib (`pip install "flexpredict-zoo[viz]"`),
imported only when a figure is drawn.
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flexpredict_zoo.atomic_write import write_file_atomically
from flexpredict_zoo.locks import claim_output
from flexpredict_zoo.show import require_matplotlib

from .logs import CSV_FIELDS, read_log_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = Union[str, Path]
LOG_NAME = "log.csv"
ITERATION = "iteration"
# (log.csv column, panel title): the loss panel comes first and also draws the smoothed loss.
PANELS: Tuple[Tuple[str, str], ...] = (
    ("loss", "loss (mean over each logging window)"), ("lr", "learning rate"), ("weight_decay", "weight decay"),
    ("momentum", "EMA momentum of the target encoder"), ("images_per_second", "images/s"),
    ("memory_gb", "peak memory (GB)"))
DEFAULT_SMOOTHING = 0.6
# The figure: 2 columns x 3 rows of panels, 12 x 10 inches at 100 dpi = 1200 x 1000 pixels.
FIGURE_INCHES = (12.0, 10.0)
FIGURE_DPI = 100
Columns = Dict[str, np.ndarray]


def plot_command(run_dir: PathLike) -> str:
    """The shell command that plots `run_dir` into RUN_DIR/plot.png (what the trainer logs at the end of a run)."""
    run = Path(run_dir)
    return f"flexpredict-train plot {shlex.quote(str(run))} --out {shlex.quote(str(run / 'plot.png'))} --overwrite"


def _log_path(run_dir: PathLike) -> Path:
    path = Path(run_dir).expanduser()
    if path.is_file() and path.name == LOG_NAME:  # a log.csv given directly is fine too
        return path
    if not path.exists():
        raise FileNotFoundError(f"run folder {path} does not exist; pass the run.output_dir of a training run")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a run folder (nor a {LOG_NAME}); pass the run.output_dir of a "
                                 f"training run")
    log = path / LOG_NAME
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: {path} is not a training run folder, or the run has not logged "
                                f"yet (it writes a row every run.log_every iterations); plot it after its first "
                                f"progress line")
    return log


def _number(text: Optional[str], log: Path, iteration: str, column: str) -> float:
    """One cell: empty (a value the trainer did not have) is NaN; anything else must be a number."""
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{log}: the row of iteration {iteration} has {column} {text!r}, not a number; the file is "
                         f"not a flexpredict-train log or was edited by hand (fix or remove that row)") from None


def read_log(run_dir: PathLike) -> Columns:
    """The columns of RUN_DIR/log.csv (or of a log.csv path) as float arrays keyed by the header's names, one
    entry per logged iteration, in increasing iteration order. Empty cells are NaN; a column the log does not
    have is absent. Rows come from the trainer's own reader (`logs.read_log_rows`); a row cut short (the one
    being written, or one a crash cut) is left out. A resumed run is one line: a segment starts wherever the
    iteration does not go up (versions before log.csv was trimmed on resume appended the rows since the resumed
    checkpoint again), and each segment replaces the rows of the earlier ones from its first iteration on.
    Raises FileNotFoundError / ValueError naming the file and what to do."""
    log = _log_path(run_dir)
    try:
        with open(log, newline="") as f:
            header = next(csv.reader(f), None)
        rows = read_log_rows(log)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{log} is not a flexpredict-train log ({e}); pass the folder of a training run") from None
    if not header:
        raise ValueError(f"{log} is empty; the run has not logged yet (a row every run.log_every iterations): "
                         f"plot it after its first progress line")
    header = [name.strip() for name in header]
    if ITERATION not in header:
        raise ValueError(f"{log} is not a flexpredict-train log: its first line has no {ITERATION!r} column "
                         f"(expected the header {','.join(CSV_FIELDS)})")
    if not rows:  # read_log_rows left out rows cut short
        raise ValueError(f"{log} has no complete row yet; plot the run after its first progress line (a row every "
                         f"run.log_every iterations)")
    kept: List[List[float]] = []
    previous = -math.inf
    for row in rows:
        values = [_number(row[name], log, row[ITERATION], name) for name in header]
        iteration = values[header.index(ITERATION)]
        if iteration <= previous:  # a resumed segment: it replaces what was logged from its first iteration on
            kept = [earlier for earlier in kept if earlier[header.index(ITERATION)] < iteration]
        kept.append(values)
        previous = iteration
    table = np.asarray(kept, dtype=np.float64)
    return {name: table[:, index] for index, name in enumerate(header)}


def smooth_ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average over the logged rows, debiased (divided by 1 - weight^n, as TensorBoard does) so
    the first rows are not pulled towards 0; NaN rows are skipped and keep the running value."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing {weight} must be in [0, 1): the weight of the past in the moving average")
    out = np.empty_like(values, dtype=np.float64)
    average, norm = 0.0, 0.0
    for index, value in enumerate(values):
        if math.isfinite(value):
            average = weight * average + (1.0 - weight) * value
            norm = weight * norm + (1.0 - weight)
        out[index] = average / norm if norm > 0 else math.nan
    return out


def run_labels(run_dirs: Sequence[PathLike]) -> List[str]:
    """Legend names: each run's folder name (that of a log.csv given directly), with as many parent folders as it
    takes to tell apart runs of the same name (a/run, b/run); the same folder given twice gets #2, #3."""
    folders = [Path(run).expanduser().resolve() for run in run_dirs]
    parts = [(folder.parent if folder.name == LOG_NAME and folder.is_file() else folder).parts for folder in folders]
    labels = []
    for index, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] and other != own for other in parts):
            depth += 1
        label = "/".join(own[-depth:])
        repeat = sum(1 for other in parts[:index] if other == own)
        labels.append(label if repeat == 0 else f"{label} #{repeat + 1}")
    return labels


def _has(columns: Columns, name: str) -> bool:
    return name in columns and bool(np.isfinite(columns[name]).any())


def draw_runs(logs: Sequence[Columns], labels: Sequence[str], smooth: float = DEFAULT_SMOOTHING) -> Figure:
    """The figure of `read_log` results: one panel per PANELS entry against the iteration, one colour per run; a
    column that a log lacks (or holds only empty cells) is skipped with a note in its panel."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth {smooth} must be in [0, 1): the weight of the past in the moving average "
                         f"(0: no smoothing)")
    require_matplotlib()  # the zoo's one check: one message naming the extra
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(3, 2, sharex=True).ravel()
    colors = [f"C{index % 10}" for index in range(len(logs))]
    for ax, (name, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        missing = [label for label, columns in zip(labels, logs) if not _has(columns, name)]
        for label, columns, color in zip(labels, logs, colors):
            if not _has(columns, name):
                continue
            x, y = columns[ITERATION], columns[name]
            if name == "loss":
                ax.plot(x, y, color=color, linewidth=0.8, alpha=0.45)
                ax.plot(x, smooth_ema(y, smooth), color=color, linewidth=2.2, label=label)
            else:
                ax.plot(x, y, color=color, linewidth=1.5, label=label)
        if missing:
            note = f"no {name} in log.csv" + ("" if len(logs) == 1 else " of " + ", ".join(missing))
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
        if name == "momentum":
            ax.ticklabel_format(axis="y", useOffset=False)  # 0.996..1.0 reads better than an offset
    axes[0].plot([], [], color="0.3", linewidth=0.8, alpha=0.45, label="raw (thin)")
    axes[0].plot([], [], color="0.3", linewidth=2.2, label=f"smoothed: EMA {smooth:g} over rows (thick)")
    axes[0].legend(fontsize=8, loc="upper right")
    for ax in axes[-2:]:
        ax.set_xlabel("iteration")
    figure.suptitle("flexpredict-train: " + ", ".join(labels), fontsize=11)
    return figure


def plot_runs(run_dirs: Sequence[PathLike], out: PathLike, smooth: float = DEFAULT_SMOOTHING,
              overwrite: bool = False) -> Path:
    """Draw the runs' log.csv into `out` (format from its suffix: .png, .pdf, .svg, ...), written atomically;
    an existing `out` is refused unless `overwrite`. Every log is read and checked before anything is drawn.
    Returns `out`."""
    if not run_dirs:
        raise ValueError("no run folder given; pass one or more RUN_DIRs")
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; pass a file name such as {out / 'plot.png'}")
    with claim_output(out, "plot", overwrite):
        logs = [read_log(run) for run in run_dirs]
        figure = draw_runs(logs, run_labels(run_dirs), smooth)
        fmt = out.suffix.lstrip(".").lower()
        supported = figure.canvas.get_supported_filetypes()
        if fmt not in supported:
            raise ValueError(f"--out {out}: cannot write {out.suffix or 'a file without a suffix'}; use one of "
                             f"{', '.join('.' + s for s in sorted(supported))}")
        return write_file_atomically(out, lambda temporary: figure.savefig(temporary, format=fmt, dpi=FIGURE_DPI))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Plot training runs from their log.csv: loss (raw and smoothed), learning rate, weight "
                          "decay, EMA momentum, images/s and memory against the iteration; several runs overlaid.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.output_dir), or log.csv files")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="picture to write (.png, .pdf, .svg, ...)")
    parser.add_argument("--smooth", type=float, default=DEFAULT_SMOOTHING,
                        help=f"EMA weight of the past for the thick loss line, over the logged rows, in [0, 1) "
                             f"(default {DEFAULT_SMOOTHING}; 0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def run(args: argparse.Namespace) -> int:
    out = plot_runs(args.runs, args.out, smooth=args.smooth, overwrite=args.overwrite)
    print(f"wrote {out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0
