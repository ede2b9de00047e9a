"""train/plot.py: log.csv reading (resumed runs as one line), the figure, and `flexpredict-train plot`."""
import csv
import importlib.util
import math
import sys

import numpy as np
import pytest
from PIL import Image

from flexpredict_zoo.train import cli
from flexpredict_zoo.train.config import from_dict
from flexpredict_zoo.train.engine import Trainer, train
from flexpredict_zoo.train.logs import CSV_FIELDS
from flexpredict_zoo.train.plot import PANELS, plot_command, read_log, run_labels, smooth_ema

TINY = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "predictor.depth=1", "predictor.embed_dim=16",
        "predictor.num_heads=2", "data.synthetic_size=16", "data.batch_size=4", "run.device=cpu"]
ORANGE = np.array([0xff, 0x7f, 0x0e])  # matplotlib's second colour (C1): the second run's lines


def write_log(run_dir, rows, fields=CSV_FIELDS, tail=""):
    """log.csv with `rows` as dicts (missing keys are empty cells), as the trainer writes it, plus raw `tail`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        f.write(tail)
    return run_dir


def row(iteration, loss, **other):
    values = dict(iteration=iteration, epoch=0, loss=loss, loss_last=loss, lr=1e-3, weight_decay=0.04,
                  momentum=0.996, images_per_second=100.0, memory_gb=1.5, elapsed_s=float(iteration))
    values.update(other)
    return values


def orange_pixels(path):
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - ORANGE).sum(axis=-1) < 30).sum())


def test_panels_are_log_columns():
    assert {name for name, _ in PANELS} <= set(CSV_FIELDS)


def test_resumed_segments_read_as_one_line_with_the_latest_values(tmp_path):
    # Older logs: a resume appends again the iterations since its checkpoint. Segment 1 logged 2..8, the run
    # resumed from the checkpoint at 4 (segment 2: 6..12), then from the one at 10 (segment 3: 12, 14).
    rows = ([row(i, 1 + i / 100) for i in (2, 4, 6, 8)] + [row(i, 2 + i / 100) for i in (6, 8, 10, 12)]
            + [row(i, 3 + i / 100, memory_gb="") for i in (12, 14)])
    columns = read_log(write_log(tmp_path / "run", rows))
    assert columns["iteration"].tolist() == [2, 4, 6, 8, 10, 12, 14]
    assert columns["loss"].tolist() == [1.02, 1.04, 2.06, 2.08, 2.10, 3.12, 3.14]
    assert columns["elapsed_s"].tolist() == [2, 4, 6, 8, 10, 12, 14]
    assert columns["memory_gb"][:5].tolist() == [1.5] * 5 and np.isnan(columns["memory_gb"][5:]).all()
    assert set(columns) == set(CSV_FIELDS)


def test_a_resume_drops_the_abandoned_tail(tmp_path):
    # Logged up to 10, resumed from the checkpoint at 4 and stopped at 6: iterations 8 and 10 were abandoned.
    rows = [row(i, 1.0) for i in (2, 4, 6, 8, 10)] + [row(6, 2.0)]
    columns = read_log(write_log(tmp_path / "run", rows))
    assert columns["iteration"].tolist() == [2, 4, 6] and columns["loss"].tolist() == [1.0, 1.0, 2.0]


def test_rows_cut_short_are_left_out_and_a_log_csv_path_is_accepted(tmp_path):
    # an older version's crash cut row 3; the resumed run appended after it: row 3 runs into row 4's text
    run = write_log(tmp_path / "run", [row(1, 0.5), row(2, 0.4)], tail="3,0,0.3")
    with open(run / "log.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=CSV_FIELDS).writerows([row(4, 0.2), row(5, 0.1)])
    with open(run / "log.csv", "a") as f:
        f.write("6,0,0.0")  # the row being written
    assert read_log(run)["iteration"].tolist() == [1, 2, 5]
    assert read_log(run / "log.csv")["loss"].tolist() == [0.5, 0.4, 0.1]


@pytest.mark.parametrize("content,expected", [
    ("", " is empty; the run has not logged yet"),
    (",".join(CSV_FIELDS) + "\n", " has no complete row yet"),
    ("step,value\n1,2\n", " is not a flexpredict-train log: its first line has no 'iteration' column"),
    (",".join(CSV_FIELDS) + "\n1,0,0.5\n", " has no complete row yet"),
    ("iteration,loss\n1,0.5\n2,abc\n", ": the row of iteration 2 has loss 'abc', not a number"),
    (b"\xff\xfe\x00garbage", " is not a flexpredict-train log ("),
], ids=["empty", "header-only", "foreign", "short-row", "not-a-number", "binary"])
def test_malformed_logs_are_errors_naming_the_file(tmp_path, content, expected):
    if isinstance(content, bytes):
        (tmp_path / "log.csv").write_bytes(content)
    else:
        (tmp_path / "log.csv").write_text(content)
    with pytest.raises(ValueError) as info:
        read_log(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'log.csv'}{expected}")


def test_smoothing_is_a_debiased_ema_over_rows():
    # weight 0.5: row 1 alone -> 1; row 2: (1 * 2 + 0.5 * 1) / (1 + 0.5); a NaN row keeps the running value
    assert smooth_ema(np.array([1.0, 2.0, math.nan]), 0.5) == pytest.approx([1.0, 2.5 / 1.5, 2.5 / 1.5])
    assert smooth_ema(np.array([3.0, 1.0]), 0.0).tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        smooth_ema(np.array([1.0]), 1.0)


def test_run_labels_tell_runs_of_the_same_name_apart(tmp_path):
    a, b, c = tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c" / "other"
    assert run_labels([a, b, c]) == ["a/run", "b/run", "other"]
    assert run_labels([c, c]) == ["other", "other #2"]
    write_log(c, [row(1, 0.5)])
    assert run_labels([c / "log.csv", b]) == ["other", "run"]


def test_plot_command_is_shell_quoted():
    assert plot_command("runs/my run") == ("flexpredict-train plot 'runs/my run' --out 'runs/my run/plot.png' "
                                           "--overwrite")


def test_absent_or_empty_columns_are_noted_not_fatal(tmp_path):
    pytest.importorskip("matplotlib")
    from flexpredict_zoo.train.plot import draw_runs
    old = [name for name in CSV_FIELDS if name != "memory_gb"]  # a log from before memory was logged
    first = write_log(tmp_path / "old", [{k: v for k, v in row(i, 1.0 / i, weight_decay="").items()
                                          if k != "memory_gb"} for i in (1, 2, 3)], fields=old)
    second = write_log(tmp_path / "new", [row(i, 0.5, images_per_second="", weight_decay="") for i in (1, 2, 3)])
    figure = draw_runs([read_log(first), read_log(second)], ["old", "new"])
    notes = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert notes["peak memory (GB)"] == ["no memory_gb in log.csv of old"]
    assert notes["images/s"] == ["no images_per_second in log.csv of new"]
    assert notes["weight decay"] == ["no weight_decay in log.csv of old, new"]
    assert notes["learning rate"] == []
    # loss: raw + smoothed per run, plus the two legend keys
    assert len(figure.axes[0].lines) == 2 * 2 + 2 and len(figure.axes[1].lines) == 2
    assert len(figure.axes[2].lines) == 0 and len(figure.axes[4].lines) == 1


def tiny_run(run_dir, **run):
    return from_dict({
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 1, "embed_dim": 32,
                                                                               "num_heads": 2}},
        "predictor": {"depth": 1, "embed_dim": 16, "num_heads": 2},
        "mask": {"min_keep": 4},
        "data": {"dataset": "synthetic", "synthetic_size": 16, "batch_size": 4, "num_workers": 0},
        "optim": {"epochs": 2, "warmup_epochs": 0.5, "lr_peak": 1e-3},
        "run": dict({"output_dir": str(run_dir), "log_every": 1, "checkpoint_every": 2, "device": "cpu"}, **run),
    })


def test_crashed_and_resumed_training_plots_as_one_line(tmp_path, monkeypatch):
    """A real run that dies after logging iteration 3 (last checkpoint: 2), resumed to 6: the plot reads
    iterations 1..6 once each, 3..6 from the resumed run."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "crashed"
    step = Trainer.train_step

    def dies_at_iteration_3(self, images, context_masks, target_masks, iteration):
        if iteration == 3:
            raise RuntimeError("node lost")
        return step(self, images, context_masks, target_masks, iteration)

    monkeypatch.setattr(Trainer, "train_step", dies_at_iteration_3)
    with pytest.raises(RuntimeError, match="node lost"):
        train(tiny_run(run, max_steps=6))
    with open(run / "log.csv") as f:
        first = [float(r["loss_last"]) for r in csv.DictReader(f)]
    assert len(first) == 3
    monkeypatch.setattr(Trainer, "train_step", step)
    resumed = train(tiny_run(run, max_steps=6))
    assert resumed["resumed_from"] is not None and len(resumed["losses"]) == 4  # iterations 3..6

    columns = read_log(run)
    assert columns["iteration"].tolist() == [1, 2, 3, 4, 5, 6]
    assert columns["loss_last"].tolist() == first[:2] + resumed["losses"]
    out = tmp_path / "plots" / "crashed.png"
    assert cli.main(["plot", str(run), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (1200, 1000) and image.format == "PNG"
    assert orange_pixels(out) == 0  # one run: one colour
    assert [p.name for p in out.parent.iterdir()] == ["crashed.png"]  # no temporary left behind


def test_cli_stopped_and_resumed_run_and_two_runs_overlaid(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for run, stops in zip(runs, ((3, 6), (6,))):
        for max_steps in stops:
            assert cli.main(["--config", "tiny_cpu", *TINY, "optim.epochs=2", "run.log_every=1",
                             f"run.output_dir={run}", f"run.max_steps={max_steps}"]) == 0
    assert read_log(runs[0])["iteration"].tolist() == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    out = tmp_path / "both.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 runs)"
    with Image.open(out) as image:
        assert image.size == (1200, 1000)
    assert orange_pixels(out) > 500  # the second run's lines are drawn

    # an existing --out is refused, and replaced with --overwrite
    before = out.read_bytes()
    assert cli.main(["plot", str(runs[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} exists; pass --overwrite to replace it or choose another --out\n"
    assert out.read_bytes() == before
    assert cli.main(["plot", str(runs[0]), "--out", str(out), "--overwrite", "--smooth", "0"]) == 0
    assert out.read_bytes() != before and orange_pixels(out) == 0


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = write_log(tmp_path / "run", [row(1, 0.5)])
    cases = [
        (["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "p.png")],
         f"error: run folder {tmp_path / 'missing'} does not exist"),
        (["plot", str(empty), "--out", str(tmp_path / "p.png")], f"error: {empty / 'log.csv'} not found"),
        (["plot", str(run), "--out", str(tmp_path)], f"error: --out {tmp_path} is a folder"),
        (["plot", str(run), "--out", str(tmp_path / "p.png"), "--smooth", "1"], "error: --smooth 1.0 must be in"),
    ]
    if importlib.util.find_spec("matplotlib") is not None:  # the suffix check asks matplotlib what it writes
        cases.append((["plot", str(run), "--out", str(tmp_path / "p.xyz")], f"error: --out {tmp_path / 'p.xyz'}: "
                                                                             f"cannot write .xyz; use one of"))
    for argv, expected in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: drawing needs matplotlib, which is not installed") and err.count("\n") == 1
    assert 'pip install "flexpredict-zoo[viz]"' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]
