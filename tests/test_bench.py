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


def test_bench_breakdown_parts_add_up_to_the_step(capsys):
    # the parts of --breakdown are the whole step: their FLOPs, counted part by part, sum to the FLOPs counted over
    # whole train steps on the same masks; and the target-encoder part is exactly the architecture's arithmetic
    result = json.loads(_run(capsys, "--config", "tiny_cpu", "--steps", "4", "--warmup", "1", "--no-compile",
                             "--device", "cpu", "--breakdown", "--json"))
    parts = result["breakdown"]["parts"]
    assert list(parts) == list(bench.PARTS)
    total = sum(p["gflop_per_image"] for p in parts.values())
    assert math.isclose(total, result["gflop_per_image"], rel_tol=1e-9)
    assert parts["optimizer"]["gflop_per_image"] == 0 and parts["ema"]["gflop_per_image"] == 0
    # tiny_cpu's encoder m4_32: 32x32 images, 4x4 patches (64 tokens), width 128, depth 4. Per token and block the
    # Linear layers do 12 x 128^2 multiply-adds, attention 2 x 64 x 128; the patch conv 48 x 128 per token.
    # torch's FlopCounterMode has no formula for the CPU attention kernel, so either count is the right one.
    linear = 4 * 64 * 2 * 12 * 128 ** 2 + 64 * 2 * 48 * 128
    attention = 4 * 64 * 2 * 2 * 64 * 128
    assert parts["targets"]["gflop_per_image"] * 1e9 in (linear, linear + attention)
    for figures in parts.values():
        assert figures["ms"] > 0
    assert result["breakdown"]["sum_of_parts_ms"] == pytest.approx(sum(p["ms"] for p in parts.values()))
    table = _run(capsys, "--config", "tiny_cpu", "--steps", "2", "--warmup", "0", "--no-compile", "--device", "cpu",
                 "--breakdown")
    for part in bench.PARTS:
        assert f"  {part}" in table
    assert "sum of parts" in table


def test_bench_breakdown_counts_no_recompute_under_activation_checkpointing(capsys):
    # model FLOPs count no recompute: with activation checkpointing on, the parts still sum to the step's FLOPs
    # and equal those counted without checkpointing
    common = ["--config", "tiny_cpu", "--steps", "1", "--warmup", "0", "--no-compile", "--device", "cpu",
              "--breakdown", "--json"]
    plain = json.loads(_run(capsys, *common))
    checkpointed = json.loads(_run(capsys, *common, "--grad-checkpointing"))
    assert checkpointed["grad_checkpointing"] is True
    for part, figures in checkpointed["breakdown"]["parts"].items():
        assert figures["gflop_per_image"] == plain["breakdown"]["parts"][part]["gflop_per_image"], part
    total = sum(p["gflop_per_image"] for p in checkpointed["breakdown"]["parts"].values())
    assert math.isclose(total, checkpointed["gflop_per_image"], rel_tol=1e-9)


def test_bench_flops_only_counts_without_timing(capsys):
    # --flops-only: the step's and the parts' FLOPs and the masks' token counts, nothing compiled or timed; the same
    # FLOPs as a timed run on the same masks
    common = ["--config", "tiny_cpu", "--no-compile", "--device", "cpu", "--breakdown", "--mask-sets", "6",
              "--flop-sets", "3", "--json"]
    counted = json.loads(_run(capsys, *common, "--flops-only"))
    timed = json.loads(_run(capsys, *common, "--steps", "1", "--warmup", "0"))
    assert "images_per_second" not in counted and counted["flop_sets"] == 3
    assert counted["gflop_per_image"] == timed["gflop_per_image"]
    assert counted["part_gflop_per_image"] == {p: f["gflop_per_image"] for p, f in timed["breakdown"]["parts"].items()}
    tokens = counted["mask_tokens"]
    assert tokens["batches"] == 6 and 1 <= tokens["distinct_pairs"] <= 6
    assert tokens["context"][0] <= tokens["context"][1] <= tokens["context"][2] <= 64  # tiny_cpu: 8x8 patches
    table = _run(capsys, *common[:-1], "--flops-only")
    assert "model FLOPs" in table and "distinct pairs in 6 batches" in table and "images/s" not in table
