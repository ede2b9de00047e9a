"""train/engine.py and train/model.py: the train step (targets, loss, EMA), the loop's non-finite stop and
unreadable-image handling."""
import math

import pytest
import torch
import torch.nn.functional as F

from flexpredict_zoo.train.config import from_dict
from flexpredict_zoo.train.data import SyntheticDataset, UnreadableImage
from flexpredict_zoo.train.engine import NonFiniteLossError, Trainer, UnreadableDataError, train
from flexpredict_zoo.train.model import repeat_interleave_batch
from flexpredict_zoo.train.run_checkpoint import load_checkpoint


def tiny(tmp_path, **sections):
    base = {
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 2, "embed_dim": 64}},
        "predictor": {"depth": 1, "embed_dim": 32, "num_heads": 4},
        "mask": {"min_keep": 4},
        "data": {"dataset": "synthetic", "synthetic_size": 32, "batch_size": 4, "num_workers": 0},
        "optim": {"epochs": 2, "warmup_epochs": 1, "lr_peak": 1e-3},
        "run": {"output_dir": str(tmp_path / "run"), "log_every": 2, "checkpoint_every": 2, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name] = dict(base[name], **values)
    return from_dict(base)


def test_repeat_interleave_batch_matches_official_loop():
    x = torch.arange(3 * 2 * 5).view(3 * 2, 5)  # 3 target blocks of batch 2
    official = torch.cat([torch.cat([x[i * 2:(i + 1) * 2] for _ in range(4)]) for i in range(3)])
    assert torch.equal(repeat_interleave_batch(x, 2, 4), official)
    assert repeat_interleave_batch(x, 2, 1) is x


def test_one_step_targets_loss_and_exact_ema(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    (images, _), context_masks, target_masks = trainer.mask_collator([trainer.dataset[i] for i in range(4)])
    # targets: layer_norm (no affine) of all target-encoder tokens, gathered per block, block-major
    model = trainer.model
    h = F.layer_norm(model.target_encoder.forward_masked(images), (64,))
    expected = torch.cat([torch.stack([h[b, m[b]] for b in range(4)]) for m in target_masks])
    got = model.compute_targets(images, target_masks)
    assert got.shape == (4 * len(target_masks), target_masks[0].shape[1], 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    target_before = [p.detach().clone() for p in model.target_encoder.parameters()]
    online_before = [p.detach().clone() for p in model.context_encoder.parameters()]
    loss = trainer.train_step(images, context_masks, target_masks, iteration=0)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and 0 < loss.item() < 10
    m = trainer.schedule.momentum(0)
    assert m == 0.996
    online_after = [p.detach() for p in model.context_encoder.parameters()]
    moved = 0
    for t_old, o_old, o_new, t_new in zip(target_before, online_before, online_after, model.target_encoder.parameters()):
        reference = (m * t_old.double() + (1 - m) * o_new.double()).float()
        # fp32 does two roundings (momentum * target, then + (1 - m) * online): within 2 ulp of the exact value
        ulp = torch.finfo(torch.float32).eps * reference.abs().clamp_min(1.0)
        assert ((t_new.detach() - reference).abs() <= 2 * ulp).all()
        moved += int(not torch.equal(o_old, o_new))
    assert moved == len(online_before)  # every encoder tensor was updated by AdamW


def test_lr_and_weight_decay_reach_the_optimizer(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    (images, _), cm, tm = trainer.mask_collator([trainer.dataset[i] for i in range(4)])
    trainer.train_step(images, cm, tm, iteration=5)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["lr"] == trainer.schedule.lr(5) and decay["weight_decay"] == trainer.schedule.weight_decay(5)
    assert no_decay["weight_decay"] == 0.0


class TurnsNaN(torch.utils.data.Dataset):
    """Readable images for the first `good` reads, then NaN images (num_workers=0: reads happen in order)."""

    def __init__(self, good):
        self.base, self.good, self.reads = SyntheticDataset(32, img_size=32), good, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        image, label = self.base[i]
        return (image if self.reads <= self.good else torch.full_like(image, float("nan"))), label


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, run={"log_every": 3, "checkpoint_every": 2})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at iteration 5\b") as e:
        train(cfg, dataset=TurnsNaN(good=4 * 4))  # iterations 1-4 fine, 5 reads NaN images
    assert "latest.pt" in str(e.value)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert ckpt["iteration"] == 4 and math.isfinite(ckpt["loss"])  # nothing saved at 6
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values())


def test_non_finite_loss_before_any_checkpoint_names_none(tmp_path):
    cfg = tiny(tmp_path, run={"log_every": 1, "checkpoint_every": 100})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at iteration 2\b") as e:
        train(cfg, dataset=TurnsNaN(good=4))  # iteration 1 fine, 2 reads NaN images; no checkpoint yet
    assert "none was written before it" in str(e.value) and "latest.pt" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()


class WithUnreadable(torch.utils.data.Dataset):
    def __init__(self, bad):
        self.base, self.bad = SyntheticDataset(16, img_size=32), set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return UnreadableImage(f"img_{i}.jpg", "truncated") if i in self.bad else self.base[i]


def test_unreadable_images_are_skipped_counted_and_limited(tmp_path):
    run = {"log_every": 4, "checkpoint_every": 100}
    cfg = tiny(tmp_path, optim={"epochs": 1}, data={"max_unreadable_fraction": 0.2}, run=run)
    summary = train(cfg, dataset=WithUnreadable(bad=[3, 11]))  # one epoch: every index read once
    assert summary["unreadable_images"] == 2 and summary["iterations"] == 4
    assert (tmp_path / "run" / "train.log").read_text().count("skipped unreadable image img_") == 2  # named once each
    cfg = tiny(tmp_path / "b", optim={"epochs": 1}, data={"max_unreadable_fraction": 0.1}, run=run)
    with pytest.raises(UnreadableDataError, match=r"2 unreadable images .*max_unreadable_fraction=0.1 of its 16 images"):
        train(cfg, dataset=WithUnreadable(bad=[3, 11]))


def test_bf16_autocast_step_on_cpu(tmp_path):
    trainer = Trainer(tiny(tmp_path, run={"precision": "bf16"}))
    assert trainer.precision == "bf16" and not trainer.scaler.is_enabled()
    (images, _), cm, tm = trainer.mask_collator([trainer.dataset[i] for i in range(4)])
    loss = trainer.train_step(images, cm, tm, iteration=0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not cast weights


def test_workers_and_persistent_loader(tmp_path):
    cfg = tiny(tmp_path, data={"num_workers": 2, "synthetic_size": 16}, run={"max_steps": 6, "log_every": 3,
                                                                         "checkpoint_every": 100})
    summary = train(cfg)  # 4 iterations per epoch: the second epoch reuses the same worker processes
    assert summary["iterations"] == 6 and all(math.isfinite(v) for v in summary["losses"])
