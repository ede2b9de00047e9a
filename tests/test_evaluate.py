"""train/evaluate.py: feature extraction, k-NN / linear / few-shot classifiers, the eval CLI."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo.train import evaluate
from flexpredict_zoo.train.data import ImageFolderDataset, SyntheticDataset
from flexpredict_zoo.train.evaluate import extract, few_shot_top1, knn_top1, linear_top1, pooled_features
from flexpredict_zoo.train.linear_probe import TensorBatches

TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("flexpredict_vit_m4_32", pretrained=False, **TINY).eval()


def clusters(n_per_class=40, classes=5, dim=16, spread=0.3, seed=0):
    """Well separated Gaussian clusters: (features, labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


@pytest.fixture(scope="module")
def separable():
    """Training points and evaluation points around the same centres, with independent noise."""
    train_x, train_y = clusters(seed=0)
    g = torch.Generator().manual_seed(123)
    test_x = train_x + 0.3 * torch.randn(train_x.shape, generator=g)
    return train_x, train_y, test_x, train_y.clone()


def test_classifiers_on_separable_features_reach_100_percent(separable):
    tx, ty, vx, vy = separable
    assert knn_top1(tx, ty, vx, vy) == 100.0
    assert linear_top1(tx, ty, vx, vy) == 100.0
    mean, std = few_shot_top1(tx, ty, vx, vy, shots=2, draws=3, return_std=True)
    assert mean >= 99.0 and std < 1.0


def test_classifiers_on_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g)
    ty, vy = torch.randint(0, 5, (1000,), generator=g), torch.randint(0, 5, (1000,), generator=g)
    for score in (knn_top1(tx, ty, vx, vy), linear_top1(tx, ty, vx, vy), few_shot_top1(tx, ty, vx, vy, draws=3)):
        assert 14.0 < score < 26.0  # chance is 20%; 1,000 test points give a standard error of about 1.3%


def test_knn_weighting_and_k():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # k=5: three class-1 neighbours outvoted by two much closer class-0 ones (exp(sim / 0.07) weights)
    assert knn_top1(train, labels, query, torch.tensor([0]), k=5) == 100.0
    # a high temperature makes the vote a plain count: 3 against 2
    assert knn_top1(train, labels, query, torch.tensor([1]), k=5, temperature=100.0) == 100.0
    # k larger than the training set is clipped
    assert knn_top1(train, labels, query, torch.tensor([0]), k=50) == 100.0


def test_few_shot_uses_the_requested_number_of_examples(monkeypatch):
    seen = []
    real = evaluate.linear_top1
    monkeypatch.setattr(evaluate, "linear_top1",
                        lambda x, y, *a, **k: seen.append((torch.as_tensor(x), torch.as_tensor(y))) or real(x, y, *a, **k))
    tx, ty = clusters(seed=0)
    few_shot_top1(tx, ty, tx, ty, shots=3, draws=4)
    assert len(seen) == 4 and all(torch.bincount(y).tolist() == [3] * 5 for _, y in seen)
    assert not torch.equal(seen[0][0], seen[1][0])  # each draw picks other examples
    with pytest.raises(ValueError, match="fewer than shots"):
        few_shot_top1(tx, ty, tx, ty, shots=41)


def test_pooled_features_last_and_last4_match_the_model():
    model = tiny_model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        last = pooled_features(model, x, "last")
        last4 = pooled_features(model, x, "last4")
        tokens = model.forward_features(x)
        # by hand: run the blocks, final-norm every one of the last 4 outputs, mean over tokens
        h = model._pos_embed(model.patch_embed(x))
        by_hand = []
        for block in model.blocks:
            h = block(h)
            by_hand.append(model.norm(h).mean(1))
    assert last.shape == (3, 32) and last4.shape == (3, 128)
    assert torch.allclose(last, tokens.mean(1), atol=1e-6)
    assert torch.allclose(last4, torch.cat(by_hand[-4:], 1), atol=1e-5)
    assert torch.allclose(last4[:, -32:], last, atol=1e-5)  # the last of the four is the last layer
    with pytest.raises(ValueError, match="last4"):
        pooled_features(model, x, "all")


def test_extract_batches_skips_unreadable_and_keeps_labels(tmp_path, caplog):
    model = tiny_model()
    ds = SyntheticDataset(10, img_size=32, num_classes=3)
    feats, labels = extract(model, ds, "last", batch_size=4)
    assert feats.shape == (10, 32) and feats.dtype == torch.float32 and labels.tolist() == [i % 3 for i in range(10)]
    with torch.no_grad():
        direct = pooled_features(model, torch.stack([ds[i][0] for i in range(10)]), "last")
    assert torch.allclose(feats, direct, atol=1e-5)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / name / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"garbage")
    folder = ImageFolderDataset(tmp_path, transform=evaluate.eval_transform(32))
    feats, labels = extract(model, folder, "last4", batch_size=2)
    assert feats.shape == (2, 128) and labels.tolist() == [0, 1]
    # named once, the way every extraction names it
    broken = tmp_path / "b" / "broken.png"
    assert caplog.text.count(f"skipped unreadable image {broken}: UnidentifiedImageError") == 1
    with torch.no_grad():
        images = torch.stack([folder[0][0], folder[2][0]])
        assert torch.allclose(feats, pooled_features(model, images, "last4"), atol=1e-5)


def brute_force_knn_top1(train_x, train_y, test_x, test_y, k, temperature=0.07):
    """The weighted k-NN vote written out over the whole similarity matrix (the reference for the streamed one)."""
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    top, idx = sims.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), int(max(train_y.max(), test_y.max())) + 1)
    votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
    return 100.0 * int((votes.argmax(1) == test_y).sum()) / len(test_y)


@pytest.mark.parametrize("batch_size, chunk", [(16384, 1024), (13, 150)])  # 13 < k: a batch smaller than k
def test_knn_streamed_over_training_batches_equals_the_whole_matrix(batch_size, chunk):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 24, generator=g)
    train_y, test_y = torch.randint(0, 6, (700,), generator=g), torch.randint(0, 6, (300,), generator=g)
    train_x = centres[train_y] + 1.2 * torch.randn(700, 24, generator=g)
    test_x = centres[test_y] + 1.2 * torch.randn(300, 24, generator=g)
    for k in (1, 20):
        expected = brute_force_knn_top1(train_x, train_y, test_x, test_y, k)
        assert 30.0 < expected < 100.0  # a problem where the neighbours matter
        assert knn_top1(train_x, train_y, test_x, test_y, k=k, batch_size=batch_size, chunk=chunk) == expected
        source = TensorBatches(train_x, train_y)  # a store-like source: no labels argument
        assert knn_top1(source, None, test_x, test_y, k=k, batch_size=batch_size, chunk=chunk) == expected


def test_eval_cli_on_digits_with_a_run_checkpoint(tmp_path, capsys, features_cache):
    from conftest import write_run  # a tiny flexpredict-train run folder
    run_dir = write_run(tmp_path / "run", TINY)
    parser = evaluate.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["knn", "--checkpoint", str(run_dir), "--data", "digits", "--layers", "last4"])
    assert evaluate.run(args) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1: ")[1].split("%")[0])
    assert "k-NN (k=20" in out and "1297 train / 500 eval" in out and "features 128" in out
    assert 20.0 < top1 <= 100.0  # a random tiny encoder still clusters digits far above chance (10%)
    # the features went through a store in the cache, one folder per weights / data / layers
    (store_dir,) = features_cache.iterdir()
    assert store_dir.name.startswith("run-digits-last4-") and str(store_dir) in out
    assert (store_dir / "train" / "index.json").is_file() and (store_dir / "val" / "index.json").is_file()


def test_store_batches_read_the_rows_extract_returns(tmp_path):
    from flexpredict_zoo.features import extract_to_store
    model = tiny_model()
    ds = SyntheticDataset(10, img_size=32, num_classes=3)
    for layers, blocks in (("last", None), ("last4", [0, 1, 2, 3])):
        store = extract_to_store(model, ds, tmp_path / layers, layers=blocks, batch_size=4, shard_size=4)
        source = evaluate.StoreBatches(store, layers)
        feats, labels = extract(model, ds, layers, batch_size=4)
        loaded = source.load()
        assert len(source) == 10 and torch.allclose(loaded[0], feats, atol=1e-6) and torch.equal(loaded[1], labels)
        batches = list(source.iter_batches(3, shuffle=True, seed=1))
        assert max(len(x) for x, _ in batches) == 3 and sorted(torch.cat([y for _, y in batches]).tolist()) == \
            sorted(labels.tolist())
    with pytest.raises(ValueError, match="holds layers \\[\\], not the last 4 blocks"):
        evaluate.StoreBatches(extract_to_store(model, ds, tmp_path / "last"), "last4")


def test_eval_linear_on_digits_names_its_choice_and_a_second_eval_extracts_nothing(tmp_path, capsys, monkeypatch):
    from conftest import write_run
    import flexpredict_zoo.features as features
    encoded = []
    real_encode = features.encode_batch
    monkeypatch.setattr(features, "encode_batch", lambda model, images, *a, **k: encoded.append(len(images))
                        or real_encode(model, images, *a, **k))
    run_dir = write_run(tmp_path / "run", TINY)
    argv = ["linear", "--checkpoint", str(run_dir), "--data", "digits", "--features-dir", str(tmp_path / "feats"),
            "--lrs", "0.1", "1.0", "--weight-decays", "0", "1e-3", "--min-steps", "30", "--epochs", "1",
            "--device", "cpu"]
    args = evaluate.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    result = evaluate.evaluate_checkpoint(args)
    assert sum(encoded) >= 1297 + 500  # every image extracted once
    assert (result["lr"], result["weight_decay"]) in [(0.1, 0.0), (0.1, 1e-3), (1.0, 0.0), (1.0, 1e-3)]
    assert len(result["sweep"]) == 4 and result["refit"] and result["train_rows"] == 1297
    assert 80 < result["val_rows"] < 180 and result["test_rows"] == 500  # 10% of 1,297 held out
    assert result["epochs"] == 15 and 20.0 < result["top1"] <= 100.0 and 20.0 < result["val_top1"] <= 100.0

    encoded.clear()
    shards = sorted((tmp_path / "feats").rglob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert evaluate.run(args) == 0
    out = capsys.readouterr().out
    assert sum(encoded) <= 2  # at most the one-image check per store: nothing extracted again
    assert [p.stat().st_mtime_ns for p in shards] == mtimes and "already complete" in out
    line = out.strip().splitlines()[-1]
    assert (f"lr {result['lr']:g}, weight decay {result['weight_decay']:g}, held-out top-1 {result['val_top1']:.2f}%"
            in line and f"top-1: {result['top1']:.2f}%" in line and "1297 train / 500 eval" in line)


def test_eval_folder_needs_train_and_val(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-dir"):
        evaluate.eval_datasets(tiny_model(), str(tmp_path))


def test_an_evaluation_waits_for_another_filling_the_same_feature_cache(tmp_path, capsys, monkeypatch):
    from conftest import lock_held_by_another_process
    from flexpredict_zoo.feature_store import LOCK_NAME
    import os
    import time
    features_dir = tmp_path / "feats"
    torch.manual_seed(0)
    model = timm.create_model("flexpredict_vit_m4_32", pretrained=False, depth=1).eval()
    train_set = evaluate.DigitsDataset("train", transform=evaluate.eval_transform(32), img_size=32)
    val_set = evaluate.DigitsDataset("heldout", transform=evaluate.eval_transform(32), img_size=32)
    sleeps = []
    with lock_held_by_another_process(features_dir / "train" / LOCK_NAME, features_dir / "train", "extraction") as pid:
        holder = [pid]

        def sleep_then_release(seconds):  # the other evaluation finishes during our first wait
            sleeps.append(seconds)
            if holder:
                os.kill(holder.pop(), 9)
                time.sleep(0.5)
        monkeypatch.setattr(evaluate.time, "sleep", sleep_then_release)
        train, val = evaluate.stored_features(model, train_set, val_set, "last", features_dir, "cpu")
    assert sleeps and sleeps[0] == evaluate.STORE_WAIT_S
    assert f"waiting for the features: {features_dir / 'train'} is in use: process {pid}" in capsys.readouterr().out
    assert (features_dir / "train" / "index.json").is_file() and (features_dir / "val" / "index.json").is_file()
