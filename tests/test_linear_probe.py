"""train/linear_probe.py: the held-out split, the heads' SGD step, feature sources and the torch probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexpredict_zoo.train.linear_probe import (LinearHeads, TensorBatches, as_batches, fit_linear_probe,
                                                held_out_rows)

FAST = dict(lrs=(0.1, 1.0), weight_decays=(0.0, 1e-3), epochs=1, min_steps=40, batch_size=64)


def clusters(n_per_class=60, classes=4, dim=12, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return 5.0 + 3.0 * (centres[labels] + spread * torch.randn(len(labels), dim, generator=g)), labels


class Recorded:
    """A source that is not a tensor (as a feature store): delegates to TensorBatches and records every batch."""

    def __init__(self, features, labels):
        self.inner, self.batches, self.passes = TensorBatches(features, labels), [], 0

    def __len__(self):
        return len(self.inner)

    def iter_batches(self, batch_size, shuffle=False, seed=0):
        self.passes += 1
        for x, y in self.inner.iter_batches(batch_size, shuffle, seed):
            self.batches.append(len(x))
            yield x, y


def test_held_out_rows_is_a_seeded_fraction_independent_of_order_and_batching():
    x = torch.randn(6000, 24, generator=torch.Generator().manual_seed(0))
    mask = held_out_rows(x, 0.1, seed=0)
    assert 0.09 < mask.float().mean() < 0.11  # 600 expected; the binomial sd is 23 rows
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert torch.equal(held_out_rows(x[perm], 0.1, seed=0), mask[perm])
    assert torch.equal(torch.cat([held_out_rows(b, 0.1, seed=0) for b in x.split(7)]), mask)
    other = held_out_rows(x, 0.1, seed=1)
    assert 0.09 < other.float().mean() < 0.11 and (other != mask).sum() > 500  # another seed, another split
    assert held_out_rows(x, 0.3, seed=0).float().mean() > 0.28
    # a row and its exact copy land on the same side; bf16 rows hash too
    twice = torch.cat([x[:100], x[:100]])
    assert torch.equal(held_out_rows(twice, 0.5, 3)[:100], held_out_rows(twice, 0.5, 3)[100:])
    assert 0.05 < held_out_rows(x.bfloat16(), 0.1, 0).float().mean() < 0.15


def test_train_step_is_sgd_on_each_heads_own_cross_entropy():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    heads = LinearHeads(6, 3, lrs=[0.5, 0.0, 2.0], weight_decays=[0.1, 0.0, 0.0])
    torch.nn.init.normal_(heads.weight)
    torch.nn.init.normal_(heads.bias)
    w0, b0 = heads.weight.clone().view(3, 3, 6), heads.bias.clone().view(3, 3)
    heads.train_step(x, y, lr_scale=0.5)
    for h, (lr, wd) in enumerate([(0.5, 0.1), (0.0, 0.0), (2.0, 0.0)]):
        w, b = w0[h].clone().requires_grad_(), b0[h].clone().requires_grad_()
        F.cross_entropy(x @ w.T + b, y).backward()
        expected_w = w0[h] - 0.5 * lr * (w.grad + wd * w0[h])
        assert torch.allclose(heads.weight.view(3, 3, 6)[h], expected_w, atol=1e-6)
        assert torch.allclose(heads.bias.view(3, 3)[h], b0[h] - 0.5 * lr * b.grad, atol=1e-6)  # no decay on bias
    # momentum 0.9: the second step moves by grad + 0.9 x the first step's grad
    before = heads.weight.clone()
    heads.train_step(x, y, lr_scale=0.0)
    assert torch.equal(heads.weight, before)
    with pytest.raises(ValueError, match="one learning rate and one weight decay per head"):
        LinearHeads(6, 3, lrs=[0.1], weight_decays=[0.0, 0.1])


def test_tensor_batches_in_order_are_views_and_shuffled_a_seeded_permutation(tmp_path):
    x, y = torch.arange(50.0).repeat(3, 1).T.contiguous(), torch.arange(50)
    source = TensorBatches(x, y)
    batches = list(source.iter_batches(16))
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    assert all(b[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for b in batches)  # no copy
    shuffled = list(source.iter_batches(16, shuffle=True, seed=3))
    rows = torch.cat([b[1] for b in shuffled])
    assert sorted(rows.tolist()) == list(range(50)) and rows.tolist() != list(range(50))
    assert all(torch.equal(b[0][:, 0].long(), b[1]) for b in shuffled)  # features stay with their labels
    assert torch.equal(torch.cat([b[1] for b in source.iter_batches(16, shuffle=True, seed=3)]), rows)
    # a numpy memory map is read a batch at a time
    path = tmp_path / "features.npy"
    np.save(path, x.numpy())
    mapped = TensorBatches(np.load(path, mmap_mode="r"), y.numpy())
    assert torch.equal(torch.cat([b[0] for b in mapped.iter_batches(16, shuffle=True, seed=3)])[:, 0].long(), rows)
    assert as_batches(source) is source
    with pytest.raises(ValueError, match="features have 50 rows but labels 49"):
        TensorBatches(x, y[:-1])


def test_probe_on_separable_clusters_reaches_100_percent_and_names_its_choice():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=0, n_per_class=20)
    result = fit_linear_probe(TensorBatches(train_x, train_y), TensorBatches(test_x, test_y), **FAST, device="cpu")
    assert result.top1 == 100.0 and result.val_top1 == 100.0
    assert (result.lr, result.weight_decay) in [(0.1, 0.0), (0.1, 1e-3), (1.0, 0.0), (1.0, 1e-3)]
    assert len(result.sweep) == 4 and {s["lr"] for s in result.sweep} == {0.1, 1.0}
    assert result.train_rows == 240 and 10 <= result.val_rows <= 40 and result.test_rows == 80  # 24 expected
    assert result.refit and result.epochs == 10 and result.steps == 2 * 10 * 4  # 4 batches of 64 per epoch
    assert result.to_dict()["lr"] == result.lr and result.dim == 12


def test_probe_on_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g)
    ty, vy = torch.randint(0, 5, (1000,), generator=g), torch.randint(0, 5, (1000,), generator=g)
    result = fit_linear_probe(TensorBatches(tx, ty), TensorBatches(vx, vy), **FAST, device="cpu")
    assert 14.0 < result.top1 < 26.0  # chance is 20%; 1,000 test points give a standard error of about 1.3%


def test_the_choice_is_made_without_the_test_set_and_reads_only_batches():
    train_x, train_y = clusters(seed=1, spread=1.6)  # overlapping: the settings score differently
    test_x, test_y = clusters(seed=2, n_per_class=30, spread=1.6)
    settings = dict(FAST, lrs=(0.001, 0.01, 0.1, 1.0), refit=False)
    first = fit_linear_probe(TensorBatches(train_x, train_y), TensorBatches(test_x, test_y), **settings)
    shuffled_test = Recorded(test_x, test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))])
    train = Recorded(train_x, train_y)
    second = fit_linear_probe(train, shuffled_test, **settings)
    # the same training set gives the same choice and held-out scores whatever the test labels are
    assert (first.lr, first.weight_decay, first.val_top1, first.sweep) == \
        (second.lr, second.weight_decay, second.val_top1, second.sweep)
    assert second.top1 < first.top1 and shuffled_test.passes == 1  # read once, at the end
    assert max(train.batches) <= 64 and max(shuffled_test.batches) <= 64  # never more than a batch at a time
    # not refit: the reported head is the sweep's, trained on the rest of the training set
    assert not second.refit and second.train_rows + second.val_rows == 240


def test_a_source_streaming_in_its_own_order_splits_the_same_rows():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=0, n_per_class=20)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(5))
    a = fit_linear_probe(TensorBatches(train_x, train_y), TensorBatches(test_x, test_y), **FAST)
    b = fit_linear_probe(Recorded(train_x[perm], train_y[perm]), TensorBatches(test_x, test_y), **FAST)
    assert a.val_rows == b.val_rows and a.top1 == b.top1 == 100.0


def test_probe_errors_say_what_to_change():
    x, y = clusters(n_per_class=2)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        fit_linear_probe(TensorBatches(x, y), TensorBatches(x, y), val_fraction=1.0)
    with pytest.raises(ValueError, match="held-out 1% of 8 training rows is empty.*larger val_fraction"):
        fit_linear_probe(TensorBatches(x, y), TensorBatches(x, y), val_fraction=0.01, **dict(FAST, min_steps=1))
    with pytest.raises(ValueError, match="labels are needed"):
        as_batches(x)


def test_streamed_feature_statistics_equal_the_whole_matrix_despite_a_large_offset():
    from flexpredict_zoo.train.linear_probe import _Statistics
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(1000, 5, generator=g, dtype=torch.float64) * torch.tensor([1e-2, 1, 10, 0, 3])).float()
    stats = _Statistics()
    for batch in x.split(33):
        stats.add(batch)
    mean, inv_std = stats.mean_and_inverse_std()
    exact = x.double()  # the float32 rows the probe sees, in float64
    assert torch.allclose(mean.double(), exact.mean(0), rtol=1e-7)
    varying = [0, 1, 2, 4]
    assert torch.allclose(inv_std[varying].double(), 1 / exact.std(0, unbiased=False)[varying], rtol=1e-4)
    assert inv_std[3] == 1.0  # a constant feature is left unscaled
