"""flexpredict-train bench on CPU with the tiny config: a smoke test of every reported field, not a speed test."""
import argparse
import json
import math

import pytest

from flexpredict_zoo.train import bench

FIELDS = ("images_per_second", "step_ms", "gflop_per_image", "model_tflops", "mfu", "peak_memory_gb")


def _run(capsys, *argv):
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    assert bench.run(args) == 0
    return capsys.readouterr().out


def test_bench_tiny_cpu_json(capsys):
    result = json.loads(_run(capsys, "--config", "tiny_cpu", "--steps", "3", "--warmup", "1", "--no-compile",
                             "--device", "cpu", "--json"))
    for key in FIELDS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["batch_size"] == 8 and result["steps"] == 3 and result["device"] == "cpu"
    assert result["compiles"] == 0 and result["recompiles"] == 0 and result["compile"] is False
    # FLOPs of the tiny step (m4_32: 64 tokens, width 128, depth 4): the target encoder's forward alone is
    # 4 blocks x 64 tokens x 24 x 128^2 multiply-adds = 0.1 GFLOP; the whole step must be more, and not absurdly so
    assert 0.1 < result["gflop_per_image"] < 1.0
    assert math.isclose(result["mfu"], result["model_tflops"] / 989.0, rel_tol=1e-9)
    assert math.isfinite(result["last_loss"])


def test_bench_table_and_batch_override(capsys):
    out = _run(capsys, "--config", "tiny_cpu", "--steps", "2", "--warmup", "0", "--no-compile", "--device", "cpu",
               "--batch-size", "4", "--peak-tflops", "1")
    for label in ("images/s", "model TFLOP/s", "MFU", "peak memory", "compiles / recompiles"):
        assert label in out
    assert "4 / 2" in out


@pytest.mark.slow
def test_bench_compiled_path_counts_compiles(capsys):
    result = json.loads(_run(capsys, "--config", "tiny_cpu", "--steps", "3", "--warmup", "2", "--compile",
                             "--compile-backend", "aot_eager", "--device", "cpu", "--json"))
    assert result["compile"] is True and result["images_per_second"] > 0
    assert 1 <= result["compiles"] <= 6 and result["recompiles"] == 0


def test_bench_rejects_missing_folder(capsys):
    with pytest.raises(FileNotFoundError, match="neither 'synthetic' nor an existing image folder"):
        _run(capsys, "--config", "tiny_cpu", "--data", "/no/such/folder")


@pytest.mark.parametrize("config", ["vit_b16", "digits_m4_32"])
def test_bench_runs_the_shipped_folder_configs_on_synthetic_data(capsys, config):
    # the shipped recipes train from a folder (data.dataset=folder without data.root): bench replaces the data
    # source before validation, which refused them on the GPU machine (benchmarks/gpu_check.py, b16 stage)
    result = json.loads(_run(capsys, "--config", config, "--steps", "1", "--warmup", "0", "--no-compile",
                             "--device", "cpu", "--batch-size", "2", "--json"))
    assert result["batch_size"] == 2 and math.isfinite(result["last_loss"])
