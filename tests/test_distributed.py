"""train/distributed.py with 2 gloo processes: real sharding, identical parameters, only rank 0 writes."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flexpredict_zoo.train.distributed import ResumableDistributedSampler, SampleKey, init_distributed

WORLD = 2
STEPS = 3
BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir, compile=False):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from flexpredict_zoo.train import engine, run_checkpoint
    from flexpredict_zoo.train.config import from_dict
    from flexpredict_zoo.train.data import SyntheticDataset

    seen, writes, final = [], [], {}

    class Recording(SyntheticDataset):
        def __getitem__(self, index):
            seen.append(int(index))
            return super().__getitem__(index)

    real_save, real_fit = run_checkpoint.atomic_save, engine.Trainer.fit

    def recording_save(state, path, also=None):
        writes.append(str(path))
        return real_save(state, path, also=also)

    def fit_and_capture(trainer):
        summary = real_fit(trainer)
        for key, module in trainer.model.networks().items():
            final.update({f"{key}.{n}": t.flatten().tolist() for n, t in module.state_dict().items()})
        if trainer.compile_counter is not None:
            final["compiles"] = trainer.compile_counter.compiles
        return summary

    run_checkpoint.atomic_save, engine.Trainer.fit = recording_save, fit_and_capture
    cfg = from_dict({
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
        "predictor": {"depth": 1, "embed_dim": 16, "num_heads": 2},
        "mask": {"min_keep": 4},
        "data": {"dataset": "synthetic", "batch_size": BATCH, "num_workers": 0},
        "optim": {"epochs": 1, "warmup_epochs": 0.5},
        "run": {"output_dir": os.path.join(out_dir, "run"), "log_every": STEPS, "checkpoint_every": 2,
                "max_steps": STEPS, "device": "cpu", "compile": compile},
    })
    summary = engine.train(cfg, dataset=Recording(32, img_size=32))  # joins the group from the torchrun variables
    state = {}
    if rank == 0:
        ckpt = torch.load(os.path.join(out_dir, "run", "checkpoints", "latest.pt"), weights_only=True)
        state = {k: {n: t.double().sum().item() for n, t in ckpt[k].items()} for k in ("encoder", "target_encoder", "predictor")}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "writes": writes, "world_size": summary["world_size"], "losses": summary["losses"],
                   "final": final, "ckpt": state}, f)


@pytest.mark.slow
def test_two_gloo_processes_shard_agree_and_only_rank0_writes(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]
    seen = [set(r["seen"]) for r in ranks]
    assert all(len(r["seen"]) == STEPS * BATCH for r in ranks)  # each rank reads only its own batches
    assert not seen[0] & seen[1]  # disjoint shards (the official trainer gave every rank everything)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == STEPS  # all-reduced mean
    assert ranks[0]["final"].keys() == ranks[1]["final"].keys() and len(ranks[0]["final"]) > 10
    for name, value in ranks[0]["final"].items():
        assert ranks[1]["final"][name] == value, name  # bit-identical across ranks after the steps
    assert ranks[1]["writes"] == [] and len(ranks[0]["writes"]) == 2  # iterations 2 and 3, rank 0 only
    for key, sums in ranks[0]["ckpt"].items():  # the checkpoint holds the weights both ranks ended with
        for name, total in sums.items():
            assert total == pytest.approx(sum(ranks[0]["final"][f"{key}.{name}"]), rel=1e-9, abs=1e-9)


def test_single_process_without_world_size(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed, env.initialized) == (0, 1, True, False, False)


def test_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        init_distributed("cpu")


def test_sampler_shards_and_skips_for_mid_epoch_resume():
    data = list(range(20))

    def expected(epoch, rank):  # DistributedSampler's order: randperm with seed + epoch, every 2nd index from rank
        return torch.randperm(20, generator=torch.Generator().manual_seed(3 + epoch))[rank::2].tolist()

    shards = [list(ResumableDistributedSampler(data, 2, r, seed=3)) for r in range(2)]
    assert [[key.index for key in shard] for shard in shards] == [expected(0, 0), expected(0, 1)]
    assert sorted(key.index for shard in shards for key in shard) == data  # disjoint and complete
    assert all(key.epoch == 0 for shard in shards for key in shard)
    assert [key.position for key in shards[0]] == list(range(10))
    sampler = ResumableDistributedSampler(data, 2, 0, seed=3)
    sampler.set_start_index(4)
    assert list(sampler) == shards[0][4:] and len(sampler) == 6  # same keys, positions 4..9
    sampler.set_epoch(1)
    sampler.set_start_index(0)
    keys = list(sampler)
    assert [key.index for key in keys] == expected(1, 0) != expected(0, 0)  # a new permutation each epoch
    assert keys[3] == SampleKey(epoch=1, index=expected(1, 0)[3], position=3)


@pytest.mark.slow
def test_two_gloo_processes_with_compiled_networks(tmp_path):
    # run.compile=true under DDP (the cluster launch): the compiled backward graphs still hand every gradient to
    # DDP's all-reduce (otherwise each rank would step on its own shard's gradients and the weights would part),
    # and the masks' changing lengths compile one graph per network (3), not one per length
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), True), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == STEPS
    assert len(set(ranks[0]["losses"])) == STEPS  # training moved
    assert ranks[0]["final"].keys() == ranks[1]["final"].keys() and len(ranks[0]["final"]) > 10
    for name, value in ranks[0]["final"].items():
        assert ranks[1]["final"][name] == value, name
    assert ranks[0]["final"]["compiles"] == 3
