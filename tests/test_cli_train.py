"""train/cli.py: `flexpredict-train` config errors, overrides, subcommand dispatch, a tiny run end to end."""
import subprocess
import sys
import types

import pytest

import torch
import yaml

from flexpredict_zoo.train import cli

TINY = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "predictor.depth=1", "predictor.embed_dim=16",
        "predictor.num_heads=2", "data.synthetic_size=16", "data.batch_size=4", "run.device=cpu"]


def test_config_errors_exit_2_with_one_line(capsys):
    assert cli.main(["--config", "tiny_cpu", "optim.lr_peek=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "Did you mean 'optim.lr_peak'" in err and "lr_final" in err
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
    assert cli.main(["missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: flexpredict-train missing is not available") and err.count("\n") == 1


def test_slurm_without_submitit_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
    assert cli.main(["slurm", "--config", "tiny_cpu", "--nodes", "2", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: submitit is not installed") and err.count("\n") == 1


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "flexpredict_zoo.train", "--config", "tiny_cpu", "optim.nope=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown config key 'optim.nope'" in out.stderr


MISSING_FILE_COMMANDS = [  # (argv with {m} for a path that does not exist, the start of the one error line)
    (["--config", "{m}/recipe.yaml"], "error: config file {m}/recipe.yaml not found"),
    (["--config", "tiny_cpu", *TINY, "data.dataset=folder", "data.root={m}/imagenet", "run.output_dir={t}/run"],
     "error: image folder {m}/imagenet does not exist"),
    (["export", "{m}/run", "--out", "{t}/out"], "error: {m}/run does not exist"),
    (["export", "{t}/run", "--out", "{t}/out", "--evaluation", "{m}/results.json"],
     "error: --evaluation file {m}/results.json does not exist"),
    (["eval", "knn", "--checkpoint", "{m}/run"], "error: {m}/run does not exist"),
    (["eval", "knn", "--checkpoint", "{t}/run", "--data", "{m}/data"], "error: training folder {m}/data/train not found"),
    (["demo", "--checkpoint", "{m}/run", "--out", "{t}/out"], "error: {m}/run does not exist"),
    (["bench", "--config", "{m}/recipe.yaml"], "error: config file {m}/recipe.yaml not found"),
    (["slurm", "--config", "{m}/recipe.yaml"], "error: config file {m}/recipe.yaml not found"),
]


@pytest.mark.parametrize("argv,expected", MISSING_FILE_COMMANDS,
                         ids=["train-config", "train-data-root", "export", "export-evaluation", "eval-checkpoint",
                              "eval-data", "demo", "bench", "slurm"])
def test_every_command_answers_a_missing_file_with_one_error_line(capsys, tmp_path, argv, expected):
    from conftest import write_run
    write_run(tmp_path / "run")
    def fill(text: str) -> str:  # not str.format: the overrides hold YAML braces
        return text.replace("{m}", str(tmp_path / "missing")).replace("{t}", str(tmp_path))

    assert cli.main([fill(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(fill(expected)) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
