"""Multi-block mask collator: statistics at 224/16, invariants, official vs corrected placement, resume, workers."""
from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flexpredict_zoo.train.masks import MaskConfig, MaskSamplingError, MultiBlockMaskCollator

GRID = 14  # 224 / 16


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"mask sampling did not return within {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def batches(collator, n, batch_size):
    return [collator.sample(batch_size) for _ in range(n)]


@pytest.mark.parametrize("mode", ["official", "corrected"])
def test_mean_sizes_at_224_16(mode):
    # Batch 64 per GPU as in the official config; the official sampler gives about 52 context and 33 target tokens at 224/16.
    col = MultiBlockMaskCollator(MaskConfig(mode=mode), seed=0)
    out = batches(col, 300, 64)
    context_len = sum(c[0].shape[1] for c, _ in out) / len(out)
    target_len = sum(t[0].shape[1] for _, t in out) / len(out)
    print(f"{mode}: mean context {context_len:.2f} tokens, mean target block {target_len:.2f} tokens")
    assert abs(context_len - 52) <= 0.15 * 52
    assert abs(target_len - 33) <= 0.15 * 33


@pytest.mark.parametrize("mode", ["official", "corrected"])
def test_invariants(mode):
    col = MultiBlockMaskCollator(MaskConfig(mode=mode), seed=3)
    for context_masks, target_masks in batches(col, 50, 32):
        assert len(context_masks) == 1 and len(target_masks) == 4
        ctx = context_masks[0]
        assert ctx.dtype == torch.long and ctx.shape[0] == 32 and ctx.shape[1] >= 10
        lengths = {t.shape for t in target_masks}
        assert lengths == {target_masks[0].shape}  # every target mask of the batch has the same length
        for m in [ctx, *target_masks]:
            assert int(m.min()) >= 0 and int(m.max()) < GRID * GRID
            assert bool((m[:, 1:] > m[:, :-1]).all())  # strictly increasing: unique and ordered
        for b in range(32):
            context_set = set(ctx[b].tolist())
            for t in target_masks:
                assert not context_set & set(t[b].tolist())
        # target blocks are rectangles h x w inside the grid
        t = target_masks[0][0]
        rows, cols = t // GRID, t % GRID
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == t.numel()


def official_block_sizes(counter: int):
    """The official sampler's per-batch sizes, re-derived here: one uniform number per block sets scale and aspect."""
    g = torch.Generator().manual_seed(counter)
    out = []
    for scale, aspect in (((0.15, 0.2), (0.75, 1.5)), ((0.85, 1.0), (1.0, 1.0))):
        r = torch.rand(1, generator=g).item()
        keep = int(GRID * GRID * (scale[0] + r * (scale[1] - scale[0])))
        ar = aspect[0] + r * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
        while h >= GRID:
            h -= 1
        while w >= GRID:
            w -= 1
        out.append((h, w))
    return out


def test_block_sizes_follow_official_sequence():
    col = MultiBlockMaskCollator(MaskConfig(mode="official"), seed=0)
    for counter in range(40):
        (th, tw), _ = official_block_sizes(counter)
        _, target_masks = col.sample(8)
        t = target_masks[0][0]
        assert t.numel() == th * tw
        assert int((t // GRID).max() - (t // GRID).min() + 1) == th


def test_official_mode_never_reaches_last_row_or_column_corrected_does():
    def touches(mode):
        col = MultiBlockMaskCollator(MaskConfig(mode=mode), seed=1)
        last_row = last_col = 0
        for context_masks, target_masks in batches(col, 60, 32):
            for m in [*context_masks, *target_masks]:
                last_row += int((m // GRID == GRID - 1).sum())
                last_col += int((m % GRID == GRID - 1).sum())
        return last_row, last_col

    assert touches("official") == (0, 0)
    row, col = touches("corrected")
    assert row > 100 and col > 100


def test_deterministic_given_seed_and_counter():
    a = batches(MultiBlockMaskCollator(MaskConfig(), seed=7), 5, 16)
    b = batches(MultiBlockMaskCollator(MaskConfig(), seed=7), 5, 16)
    c = batches(MultiBlockMaskCollator(MaskConfig(), seed=8), 5, 16)
    for (ca, ta), (cb, tb) in zip(a, b):
        assert torch.equal(ca[0], cb[0]) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert any(not torch.equal(x[0][0], y[0][0]) for x, y in zip(a, c))
    # consecutive batches differ
    assert not torch.equal(a[0][0][0][:, :10], a[1][0][0][:, :10])


def test_resume_from_state_dict_gives_the_same_next_masks():
    first = MultiBlockMaskCollator(MaskConfig(), seed=5)
    batches(first, 6, 8)
    state = first.state_dict()
    assert state["counter"] == 6
    expected = batches(first, 3, 8)
    resumed = MultiBlockMaskCollator(MaskConfig(), seed=0)
    resumed.load_state_dict(state)
    for (ce, te), (cr, tr) in zip(expected, batches(resumed, 3, 8)):
        assert torch.equal(ce[0], cr[0]) and all(torch.equal(x, y) for x, y in zip(te, tr))


def test_tiny_grid_raises_a_clear_error_instead_of_hanging():
    with time_limit(10):
        with pytest.raises(MaskSamplingError, match=r"grid 4x4.*min_keep=10"):
            MultiBlockMaskCollator(MaskConfig(input_size=64, patch_size=16, min_keep=10))
        with pytest.raises(MaskSamplingError, match="grid too small"):
            MultiBlockMaskCollator(MaskConfig(input_size=16, patch_size=16, min_keep=0))


def crowded_config(**kw):
    # 8x8 grid, 4 target blocks of 4x4 inside a 6x6 context block: the context is often nearly covered.
    return MaskConfig(input_size=32, patch_size=4, target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
                      context_scale=(0.5, 0.5), min_keep=10, **kw)


def test_retries_are_bounded_and_relaxation_follows_the_official_rule():
    with time_limit(10):
        with pytest.raises(MaskSamplingError, match="after 3 tries"):
            batches(MultiBlockMaskCollator(crowded_config(max_tries=3), seed=0), 20, 32)
        col = MultiBlockMaskCollator(crowded_config(), seed=0)
        relaxed = 0
        for _ in range(20):
            context_masks, _ = col.sample(32)
            relaxed += col.last_relaxed
            assert context_masks[0].shape[1] >= 10
    assert relaxed > 0  # the crowded grid needed the relaxed constraint and still produced valid masks


def test_allow_overlap_keeps_the_whole_context_block():
    col = MultiBlockMaskCollator(MaskConfig(allow_overlap=True), seed=0)
    for context_masks, _ in batches(col, 10, 16):
        k = context_masks[0].shape[1]
        assert int(round(math.sqrt(k))) ** 2 == k  # square context block, nothing removed


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        MaskConfig(mode="fast")
    with pytest.raises(ValueError, match="target_scale"):
        MaskConfig(target_scale=(0.3, 0.2))


class CollateWithState:
    """collate_fn returning the mask generator's state right after each batch, as the trainer uses it."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, batch):
        collated, context_masks, target_masks = self.collator(batch)
        return collated, context_masks, target_masks, self.collator.state_dict()


def mask_key(context_masks, target_masks):
    return tuple(context_masks[0].flatten().tolist()), tuple(tuple(t.flatten().tolist()) for t in target_masks)


def test_collate_through_dataloader_with_two_workers():
    data = TensorDataset(torch.randn(40, 3, 8, 8), torch.arange(40))
    col = MultiBlockMaskCollator(MaskConfig(), seed=11)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=CollateWithState(col))
    seen, states = [], []
    for (images, labels), context_masks, target_masks, state in loader:
        assert images.shape == (4, 3, 8, 8) and labels.shape == (4,)
        seen.append(mask_key(context_masks, target_masks))
        states.append(state["counter"])
    assert len(seen) == 10 and len(set(seen)) == 10  # distinct masks per batch
    # The counter is shared: batch i got counter i whichever worker built it, and the main process sees 10.
    assert states == list(range(1, 11))
    assert col.state_dict()["counter"] == 10
    assert seen == [mask_key(*col._sample(4, counter)) for counter in range(10)]
    # A second pass (a new loader iteration, as the next epoch) continues with counters 10..19.
    second = [mask_key(c, t) for _, c, t, _ in loader]
    assert second == [mask_key(*col._sample(4, counter)) for counter in range(10, 20)]

    # Resume after batch 4 of the first pass, with workers: the remaining batches get the same masks.
    resumed = MultiBlockMaskCollator(MaskConfig(), seed=0)
    resumed.load_state_dict({"counter": states[3], "seed": 11})
    rest = DataLoader(torch.utils.data.Subset(data, range(16, 40)), batch_size=4, num_workers=2,
                      collate_fn=CollateWithState(resumed))
    assert [mask_key(c, t) for _, c, t, _ in rest] == seen[4:]
