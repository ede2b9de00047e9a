"""benchmarks/gpu_check.py on CPU (--smoke): the end-to-end trainer stage (kill, resume, equal losses), the profile
stage, and the budget (a stage that runs out of time is stopped; the JSON keeps what was measured before)."""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_e2e_and_profile_write_their_figures(gpu_check, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert gpu_check.main(["--smoke", "--only", "e2e,profile", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu (smoke)" and set(saved["results"]) == {"e2e", "profile"}
    e2e = saved["results"]["e2e"]
    assert "data.decode=gpu" in e2e["command"] and "run.checkpoint_every=3" in e2e["command"]
    assert e2e["images_per_second"] > 0 and e2e["resumed_images_per_second"] > 0
    assert e2e["killed_returncode"] == -9 and e2e["killed_after_iteration"] >= 3  # SIGKILL after the checkpoint at 3
    assert e2e["resumed_at_iteration"] == 3 and e2e["log_rows_once_each"] is True
    assert e2e["compared_iterations"] == [4, 5, 6, 7, 8]
    assert len(e2e["straight_losses"]) == 5 and all(map(math.isfinite, e2e["straight_losses"]))
    assert len(set(e2e["straight_losses"])) == 5  # a real trajectory, not a constant
    assert e2e["resumed_losses"] == e2e["straight_losses"] and e2e["losses_equal"] is True  # exact on CPU
    assert e2e["loss_max_abs_diff"] == 0.0 and e2e["weights_equal"] is True and e2e["weights_max_abs_diff"] == 0.0
    profile = saved["results"]["profile"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0 and profile["aten_ops_per_step"] > 100
    assert 1 <= len(profile["top"]) <= 15
    assert all(row["total_ms"] > 0 and row["calls_per_step"] > 0 for row in profile["top"])
    assert sum(row["share_of_busy"] for row in profile["top"]) <= 1 + 1e-9
    table = capsys.readouterr().out
    assert "resumed losses equal; final weights equal" in table and "img/s (log.csv median)" in table


def test_union_of_busy_intervals(gpu_check):
    assert gpu_check._union_us([(5, 6), (0, 2), (1, 3), (1.5, 2.5)]) == 4
    assert gpu_check._union_us([]) == 0


def test_a_stage_past_the_budget_is_stopped_and_the_json_keeps_the_others(gpu_check, tmp_path, monkeypatch):
    def fake(stage, args):
        if stage == "b16":
            raise RuntimeError("out of memory")
        time.sleep(30)  # e2e: runs past the budget
        return {}

    monkeypatch.setattr(gpu_check, "run_stage", fake)
    out = tmp_path / "results.json"
    start = time.perf_counter()
    code = gpu_check.main(["--smoke", "--only", "b16,e2e,profile", "--budget-s", "1.5", "--json", str(out)])
    assert code == 1 and time.perf_counter() - start < 10
    results = json.loads(out.read_text())["results"]
    assert results["b16"]["error"] == "error: RuntimeError: out of memory"
    assert results["e2e"]["error"].startswith("timed out: StageTimeout") and results["e2e"]["stage_s"] < 5
    assert results["profile"]["skipped"].startswith("skipped:") and "--only profile" in results["profile"]["skipped"]


@pytest.mark.slow
def test_smoke_train_stages_breakdown_compile_mode_and_equality_at_the_recipe_pace(gpu_check, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert gpu_check.main(["--smoke", "--only", "b16,equality,b16_cudagraphs", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["b16_cudagraphs"]["compile_mode"] == "reduce-overhead" and results["b16_cudagraphs"]["compiles"] == 3
    breakdown = results["b16"]["breakdown"]
    assert list(breakdown["parts"]) == ["targets", "context", "predictor", "optimizer", "ema"]
    assert breakdown["compiles_during"] == 0  # the parts run the step's compiled graphs, nothing new
    equality = results["equality"]
    # the 8 smoke steps are the first 8 of a 625-iteration-per-epoch run of tiny_cpu (lr 2e-4 -> 1e-3 over
    # 0.25 epochs = 156 warm-up steps): still in the warm-up, as in a real run's first steps
    assert equality["iterations_per_epoch"] == 625
    assert equality["lr_first_last"] == pytest.approx([2e-4 + (1 / 156) * 8e-4, 2e-4 + (8 / 156) * 8e-4])
    assert equality["passed"] is True
    table = capsys.readouterr().out
    assert "  predictor" in table and "sum of parts" in table and "compiles during the breakdown: 0" in table


def test_smoke_data_stage_splits_the_gpu_path(gpu_check, tmp_path):
    out = tmp_path / "results.json"
    assert gpu_check.main(["--smoke", "--only", "data", "--json", str(out)]) == 0
    data = json.loads(out.read_text())["results"]["data"]
    assert data["cpu_path"]["images_per_second"] > 0 and data["gpu_path"]["images_per_second"] > 0
    split = data["gpu_path"]["split"]  # each piece of the GPU path alone: which one limits it
    assert list(split) == ["loader_bytes", "decode", "augment"] and all(v > 0 for v in split.values())
