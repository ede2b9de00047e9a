"""sincos_2d against the MAE/I-JEPA sin-cos formula (first half of the channels: column, second half: row) and
the official numpy function (float64 reference)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpredict_zoo.pos_embed import sincos_1d, sincos_2d

sys.path.insert(0, str(Path(__file__).parent))
from reference_encoder import direct_pos_embed, get_2d_sincos_pos_embed  # noqa: E402


@pytest.mark.parametrize("embed_dim, grid", [(64, 14), (192, (14, 14)), (32, (3, 7)), (48, (5, 2)), (16, 1)])
def test_matches_direct_formula_and_official_function(embed_dim, grid):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    emb = sincos_2d(embed_dim, grid, dtype=torch.float64)
    assert emb.shape == (1, rows * cols, embed_dim) and emb.dtype == torch.float64
    direct = direct_pos_embed(embed_dim, rows, cols)
    assert np.abs(emb[0].numpy() - direct).max() < 1e-12
    assert np.abs(emb[0].numpy() - get_2d_sincos_pos_embed(embed_dim, (rows, cols))).max() < 1e-12


def test_values_at_specific_positions():
    D, rows, cols = 16, 3, 5  # half width d = 8: omega_k = 10000 ** (-k / 4), k = 0..3
    emb = sincos_2d(D, (rows, cols), dtype=torch.float64)[0]
    r, c = 2, 3
    token = emb[r * cols + c]  # row-major
    for k in range(4):
        omega = 10000.0 ** (-k / 4)
        assert token[k].item() == pytest.approx(math.sin(c * omega), abs=1e-15)
        assert token[4 + k].item() == pytest.approx(math.cos(c * omega), abs=1e-15)
        assert token[8 + k].item() == pytest.approx(math.sin(r * omega), abs=1e-15)
        assert token[12 + k].item() == pytest.approx(math.cos(r * omega), abs=1e-15)
    # Origin token: sin 0 = 0 and cos 0 = 1 in both halves.
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    # Lowest frequency (k = 0) is exactly the position in radians.
    assert emb[1 * cols + 4, 0].item() == pytest.approx(math.sin(4.0), abs=1e-15)
    assert emb[1 * cols + 4, 8].item() == pytest.approx(math.sin(1.0), abs=1e-15)


def test_first_half_is_column_second_half_is_row():
    emb = sincos_2d(32, (4, 6), dtype=torch.float64)[0].reshape(4, 6, 32)
    for r in range(4):
        assert torch.equal(emb[r, :, :16], emb[0, :, :16])  # first half depends only on the column
    for c in range(6):
        assert torch.equal(emb[:, c, 16:], emb[:, 0, 16:])  # second half only on the row
    assert (emb[0, 1, :16] - emb[0, 0, :16]).abs().max() > 0.5
    assert (emb[1, 0, 16:] - emb[0, 0, 16:]).abs().max() > 0.5
    # A non-square grid is not its transpose: rows and columns are not interchangeable.
    assert not torch.equal(sincos_2d(32, (4, 6))[0], sincos_2d(32, (6, 4))[0])


def test_dtype_device_and_float32_rounding():
    emb32 = sincos_2d(64, 14)
    assert emb32.dtype == torch.float32 and emb32.device.type == "cpu" and emb32.shape == (1, 196, 64)
    # Computed in float64 then rounded once, as the official numpy array cast with .float().
    official = torch.from_numpy(get_2d_sincos_pos_embed(64, 14)).float()
    assert torch.equal(emb32[0], official)
    assert sincos_2d(64, 14, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(sincos_2d(64, 14), sincos_2d(64, (14, 14)))


def test_sincos_1d():
    pos = torch.tensor([0.0, 1.0, 7.0])
    out = sincos_1d(8, pos)
    assert out.shape == (3, 8) and out.dtype == torch.float64
    omega = 10000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.sin(np.outer([0, 1, 7], omega)), np.cos(np.outer([0, 1, 7], omega))], axis=1)
    assert np.abs(out.numpy() - expected).max() < 1e-15


def test_invalid_widths():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(7, torch.arange(3))
