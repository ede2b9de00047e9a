"""train/cli.py: `flexpredict-train` config errors, overrides, subcommand dispatch, a tiny run end to end."""
import subprocess
import sys
import types

import torch
import yaml

from flexpredict_zoo.train import cli

TINY = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "predictor.depth=1", "predictor.embed_dim=16",
        "predictor.num_heads=2", "data.synthetic_size=16", "data.batch_size=4", "run.device=cpu"]


def test_config_errors_exit_2_with_one_line(capsys):
    assert cli.main(["--config", "tiny_cpu", "optim.lr_peek=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Did you mean 'optim.lr_peak'" in err and "lr_final" in err
    assert cli.main(["--config", "no_such_config"]) == 2
    assert "shipped configs: " in capsys.readouterr().err
    assert cli.main(["--config", "tiny_cpu", "optim.lr_peak"]) == 2
    assert "key.sub=value" in capsys.readouterr().err


def test_print_config_applies_overrides(capsys):
    assert cli.main(["--config", "tiny_cpu", "optim.lr_peak=5e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr_peak"] == 5e-4 and printed["model"]["name"] == "flexpredict_vit_m4_32"


def test_train_end_to_end_and_resume_noop(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--config", "tiny_cpu", *TINY, f"run.output_dir={run}", "run.max_steps=2", "run.checkpoint_every=1"]
    assert cli.main(args) == 0
    assert "trained 2 iterations (2 in this run)" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["max_steps"] == 2 and saved["predictor"]["embed_dim"] == 16
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["iteration"] == 2
    assert len((run / "log.csv").read_text().splitlines()) == 2  # header + the row at iteration 2
    assert cli.main(["train", *args]) == 0  # resume=auto: already at max_steps, nothing to do
    assert "nothing to do: the run is already at iteration 2" in capsys.readouterr().out


def test_subcommands_are_dispatched_lazily(monkeypatch, capsys):
    fake = types.ModuleType("flexpredict_zoo.train._fake_sub")
    fake.add_arguments = lambda parser: parser.add_argument("run_dir")
    fake.run = lambda args: 7 if args.run_dir == "RUN" else 0
    monkeypatch.setitem(sys.modules, "flexpredict_zoo.train._fake_sub", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("_fake_sub", "test"))
    assert cli.main(["fake", "RUN"]) == 7
    monkeypatch.setitem(cli.SUBCOMMANDS, "missing", ("_no_such_module", "test"))
    assert cli.main(["missing"]) == 1
    assert "flexpredict-train missing: not available" in capsys.readouterr().err


def test_slurm_without_submitit_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
    assert cli.main(["slurm", "--config", "tiny_cpu", "--nodes", "2", "--gpus-per-node", "8"]) == 1
    assert "submitit is not installed" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "flexpredict_zoo.train", "--config", "tiny_cpu", "optim.nope=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown config key 'optim.nope'" in out.stderr
