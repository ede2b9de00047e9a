"""train/schedules.py: exact values at known iterations (official step-then-compute convention)."""
import math

import pytest

from flexpredict_zoo.train.config import OptimConfig
from flexpredict_zoo.train.schedules import Schedule


def b16(ipe=100):
    return Schedule.from_config(OptimConfig(epochs=600, warmup_epochs=15), ipe)


def test_lengths():
    s = b16()
    assert (s.total_steps, s.warmup_steps) == (60_000, 1_500)
    assert Schedule.from_config(OptimConfig(epochs=10, ipe_scale=1.25), 8).total_steps == 100


def test_lr_warmup_and_cosine_exact():
    s = b16()
    assert s.lr(0) == pytest.approx(2e-4 + (1 / 1500) * 6e-4, abs=1e-15)  # official: step 1 at the first update
    assert s.lr(749) == pytest.approx(5e-4, abs=1e-15)  # half-way through warmup
    assert s.lr(1499) == pytest.approx(8e-4, abs=1e-15)  # peak
    mid = 1500 + (60_000 - 1500) // 2 - 1  # cosine half-way: (peak + final) / 2
    assert s.lr(mid) == pytest.approx(4.5e-4, abs=1e-15)
    assert s.lr(59_999) == pytest.approx(1e-4, abs=1e-15)
    assert s.lr(70_000) == pytest.approx(1e-4, abs=1e-15)  # never below final


def test_weight_decay_cosine_exact():
    s = b16()
    assert s.weight_decay(-1) == pytest.approx(0.04, abs=1e-15)
    assert s.weight_decay(29_999) == pytest.approx(0.22, abs=1e-15)
    assert s.weight_decay(14_999) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert s.weight_decay(59_999) == pytest.approx(0.4, abs=1e-15)


def test_momentum_linear_exact():
    s = b16()
    assert s.momentum(0) == 0.996
    assert s.momentum(30_000) == pytest.approx(0.998, abs=1e-15)
    assert s.momentum(60_000) == pytest.approx(1.0, abs=1e-15)
    assert s.momentum(90_000) == pytest.approx(1.0, abs=1e-15)


def test_vit_h_constant_from_epoch_250():
    cfg = OptimConfig(epochs=300, lr_peak=1e-3, lr_final=1e-6, warmup_epochs=40, constant_from_epoch=250)
    s = Schedule.from_config(cfg, 10)
    free = Schedule.from_config(OptimConfig(epochs=300, lr_peak=1e-3, lr_final=1e-6, warmup_epochs=40), 10)
    frozen_lr, frozen_wd = free.lr(2500), free.weight_decay(2500)
    assert s.lr(2499) == free.lr(2499) and s.lr(2500) == frozen_lr
    for it in (2501, 2800, 2999):
        assert s.lr(it) == frozen_lr and s.weight_decay(it) == frozen_wd
        assert free.lr(it) < frozen_lr and free.weight_decay(it) > frozen_wd
    assert s.momentum(2999) == free.momentum(2999)  # EMA keeps going
    assert 1e-6 < frozen_lr < 1e-3 and 0.04 < frozen_wd < 0.4
