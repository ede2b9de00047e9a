"""flexpredict_zoo/show.py: the joint PCA picture, similarity maps, the contact sheet, `flexpredict-zoo show`."""
from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib", reason="show needs matplotlib (the viz extra)")

from flexpredict_zoo import cli  # noqa: E402
from flexpredict_zoo.features import extract_features  # noqa: E402
from flexpredict_zoo.show import pca_rgb, show, similarity_maps  # noqa: E402

DIGITS_MODEL = "flexpredict_vit_m4_32.digits_stop"  # shipped weights, 32x32 inputs, patch 4: an 8x8 grid


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from flexpredict_zoo.train.data import DigitsDataset
    heldout = DigitsDataset("heldout")
    folder = tmp_path_factory.mktemp("digits")
    for i in range(3):
        ink = ((1 - heldout.pixels[i, 0].clamp(0, 1)) * 255).round().byte().numpy()
        Image.fromarray(ink, "L").convert("RGB").save(folder / f"d{i}.png")
    return folder


def _photos(folder: Path, count: int = 3, size: int = 80) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    return folder


def _cosine_maps(tokens: torch.Tensor, image: int, index: int) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(tokens, tokens[image, index].view(1, 1, -1), dim=-1)


# ------------------------------------------------------------------------------------------------ PCA
def test_pca_finds_the_constructed_components_with_fixed_signs():
    """Features whose patch coordinates along dims 3, 0 and 5 of 8 are exactly uncorrelated with standard
    deviations 3, 2 and 1 (plus noise 1e-4): the components are those axes, in that order, each signed so its
    largest loading is positive, and the projections are the coordinates minus their mean."""
    g = torch.Generator().manual_seed(0)
    images, grid, dim = 4, (6, 6), 8
    centred = torch.randn(images * 36, 3, generator=g)
    q, _ = torch.linalg.qr(centred - centred.mean(0))  # orthonormal columns, each of mean 0
    coords = q * torch.tensor([3.0, 2.0, 1.0]) * 12.0
    # the first coordinate is signed to score lower on the border, so the border rule keeps the loading's sign
    inner = torch.zeros(6, 6, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    inner = inner.flatten().repeat(images)
    if coords[~inner, 0].mean() > coords[inner, 0].mean():
        coords[:, 0] = -coords[:, 0]
    tokens = torch.randn(images * 36, dim, generator=g) * 1e-4
    for k, axis in enumerate((3, 0, 5)):
        tokens[:, axis] += coords[:, k]
    tokens += torch.randn(dim, generator=g)  # an offset common to all patches: removed by the centring
    pca = pca_rgb(tokens.reshape(images, 36, dim), grid)

    for k, axis in enumerate((3, 0, 5)):
        expected = torch.zeros(dim)
        expected[axis] = 1.0
        assert torch.allclose(pca.components[k], expected, atol=1e-3), (k, pca.components[k])
        assert torch.allclose(pca.projections.reshape(-1, 3)[:, k], coords[:, k], atol=1e-3)
    assert pca.rgb.shape == (images, 6, 6, 3) and float(pca.rgb.min()) == 0.0 and float(pca.rgb.max()) == 1.0
    # the scaling keeps the order: the brightest red is the patch of the largest first coordinate (up to clipping)
    assert float(pca.rgb.reshape(-1, 3)[coords[:, 0].argmax(), 0]) == 1.0
    assert pca.foreground is None


def test_pca_first_component_scores_the_border_low_and_the_threshold_drops_it():
    """Background on the border (-4 along dim 0), foreground inside (+4, with colour structure on dims 1-3). Built
    so that the largest-loading rule alone would give the border the high first component: the border rule must
    flip it. A threshold of 0.5 then keeps exactly the inner patches, draws the border black and refits the PCA on
    the inner patches alone (dims 1, 2, 3)."""
    g = torch.Generator().manual_seed(1)
    images, rows, cols, dim = 3, 7, 7, 6
    inner = torch.zeros(rows, cols, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    inner = inner.flatten().repeat(images)
    tokens = torch.randn(images * rows * cols, dim, generator=g) * 1e-3
    tokens[:, 0] = torch.where(inner, -4.0, 4.0)  # inner negative: the loading sign rule favours the border
    for axis, scale in ((1, 1.5), (2, 1.0), (3, 0.5)):
        tokens[inner, axis] += torch.randn(int(inner.sum()), generator=g) * scale
    pca = pca_rgb(tokens.reshape(images, rows * cols, dim), (rows, cols), background_threshold=0.5)

    first = pca.first.reshape(-1)
    assert float(first[~inner].max()) < 1e-3 and float(first[inner].min()) > 0.9
    assert torch.equal(pca.foreground.reshape(-1), inner)
    assert float(pca.rgb.reshape(-1, 3)[~inner].abs().max()) == 0.0
    # refitted on the foreground, where dim 0 is constant: the three components span dims 1-3 only
    assert float(pca.components[:, 0].abs().max()) < 1e-3
    assert torch.allclose(pca.components[:, 1:4].pow(2).sum(1), torch.ones(3), atol=1e-4), pca.components
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        pca_rgb(tokens.reshape(images, rows * cols, dim), (rows, cols), background_threshold=1.5)


# ------------------------------------------------------------------------------------------------ similarity
def test_similarity_map_is_the_cosine_to_the_chosen_patch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 20, 16, generator=g)
    maps = similarity_maps(tokens, (4, 5), image=1, row=2, col=3)
    assert maps.shape == (3, 4, 5)
    assert float(maps[1, 2, 3]) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(maps.reshape(3, 20), _cosine_maps(tokens, 1, 2 * 5 + 3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"patch \(4, 0\) is outside the 4x5 patch grid: rows 0..3, columns 0..4"):
        similarity_maps(tokens, (4, 5), image=0, row=4, col=0)


# ------------------------------------------------------------------------------------------------ show
def test_show_digits_writes_the_sheet_page_and_maps(digits, tmp_path):
    paths = show(DIGITS_MODEL, digits, tmp_path / "out", patch=(2, 5), patch_image=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["contact_sheet.png", "maps.npz", "show.html"]
    arrays = np.load(paths["maps"])
    assert list(arrays["names"]) == ["d0.png", "d1.png", "d2.png"] and tuple(arrays["grid"]) == (8, 8)
    tokens = extract_features(DIGITS_MODEL, digits, patch_tokens=True).patch_tokens
    np.testing.assert_allclose(arrays["similarity"].reshape(3, 64), _cosine_maps(tokens, 1, 2 * 8 + 5).numpy(),
                               atol=1e-5)
    assert arrays["similarity"][1, 2, 5] == pytest.approx(1.0, abs=1e-5)

    # 3 rows of 192 px tiles: width 160 (labels) + 3 x 192 + 4 x 8 gaps = 768; height 3 title lines and 1 line of
    # column titles (4 x 15) + 8 + 3 x 192 + 4 x 8 = 676
    with Image.open(paths["contact_sheet"]) as sheet:
        assert sheet.size == (768, 676) and sheet.mode == "RGB"
        pixels = np.asarray(sheet)
    # the chosen patch is outlined in red on image 1's input: its left edge at x = 168 + 5 x 24, rows 1/8 of a tile
    top = 60 + 8 + 8 + 192 + 8  # titles, gap, first gap, row 0, gap
    red, green, blue = pixels[top + 2 * 24 + 12, 168 + 5 * 24].astype(int)
    assert red > 200 and green < 80 and blue < 80, (red, green, blue)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a real picture

    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # self-contained
    data = json.loads(re.search(r'<script id="show-data" type="application/json">(.*?)</script>', page, re.S)[1])
    # the page holds the L2-normalised patch tokens as float16: 3 images x 64 patches x 128 dims
    features = np.frombuffer(base64.b64decode(data["features"]), dtype="<f2").reshape(3, 64, 128)
    unit = torch.nn.functional.normalize(tokens, dim=-1).numpy()
    np.testing.assert_allclose(features.astype(np.float32), unit, atol=2.0 ** -11, rtol=2.0 ** -11)
    assert len(page) - len(data["features"]) < 20_000  # the rest: 3 small PNGs, a colour table, the script


def test_timm_vit_with_class_and_register_tokens(tmp_path):
    """A timm ViT with a class token and 4 register tokens: the maps cover the 4x4 patches only."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4, img_size=64, num_classes=0)
    assert model.num_prefix_tokens == 5
    images = _photos(tmp_path / "photos")
    paths = show(model, images, tmp_path / "out", patch=(0, 3))
    arrays = np.load(paths["maps"])
    assert tuple(arrays["grid"]) == (4, 4) and arrays["similarity"].shape == (3, 4, 4)
    assert arrays["pca_rgb"].shape == (3, 4, 4, 3)
    # the expected maps, from the model's own forward: tokens after the 5 prefix tokens
    from flexpredict_zoo.features import model_eval_transform, read_image
    transform, _ = model_eval_transform(model)
    batch = torch.stack([transform(read_image(p)) for p in sorted(images.iterdir())])
    with torch.no_grad():
        patches = model.forward_features(batch)[:, 5:]
    assert patches.shape[1] == 16
    np.testing.assert_allclose(arrays["similarity"].reshape(3, 16), _cosine_maps(patches, 0, 3).numpy(), atol=1e-5)


def test_dynamic_img_size_and_resized_models(tmp_path):
    import timm
    images = _photos(tmp_path / "photos", count=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True,
                              reg_tokens=2, num_classes=0)
    arrays = np.load(show(model, images, tmp_path / "dynamic", img_size=96)["maps"])
    assert tuple(arrays["grid"]) == (6, 6) and tuple(arrays["image_size"]) == (96, 96)
    assert tuple(arrays["patch"]) == (0, 3, 3) and arrays["similarity"][0, 3, 3] == pytest.approx(1.0, abs=1e-5)
    # a zoo model loaded by name, resized for 48 px: patch 4 gives a 12x12 grid
    arrays = np.load(show(DIGITS_MODEL, images, tmp_path / "resized", img_size=48)["maps"])
    assert tuple(arrays["grid"]) == (12, 12) and arrays["similarity"].shape == (2, 12, 12)
    with pytest.raises(ValueError, match="build it with dynamic_img_size=True or img_size=48"):
        show(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64), images, tmp_path / "x",
             img_size=48)


# ------------------------------------------------------------------------------------------------ CLI
def _run(argv, capsys):
    code = cli.main(["show", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_and_refuses_to_overwrite(digits, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, _ = _run([DIGITS_MODEL, digits, "--out", out, "--patch", "0,7"], capsys)
    assert code == 0 and f"wrote {out / 'contact_sheet.png'}" in printed
    assert tuple(np.load(out / "maps.npz")["patch"]) == (0, 0, 7)
    before = (out / "show.html").stat().st_mtime_ns
    code, _, err = _run([DIGITS_MODEL, digits, "--out", out], capsys)
    assert code == 2 and err.count("error:") == 1 and "already holds contact_sheet.png" in err
    assert "--overwrite" in err and (out / "show.html").stat().st_mtime_ns == before
    code, _, _ = _run([DIGITS_MODEL, digits, "--out", out, "--overwrite"], capsys)
    assert code == 0 and tuple(np.load(out / "maps.npz")["patch"]) == (0, 4, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries or locks left


def test_cli_errors_are_one_line(digits, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run([DIGITS_MODEL, empty, "--out", tmp_path / "o1"], capsys)
    assert code == 2 and err.strip().startswith("error: no images found in folder") and err.count("\n") == 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes((digits / "d0.png").read_bytes())
    (bad / "broken.png").write_bytes(b"not a png")
    code, _, err = _run([DIGITS_MODEL, bad, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "cannot read image" in err and "broken.png" in err and err.count("\n") == 1

    code, _, err = _run([DIGITS_MODEL, digits, "--out", tmp_path / "o3", "--patch", "8,0"], capsys)
    assert code == 2 and "patch (8, 0) is outside the 8x8 patch grid" in err and "rows 0..7, columns 0..7" in err
    code, _, err = _run([DIGITS_MODEL, digits, "--out", tmp_path / "o4", "--patch-image", "3"], capsys)
    assert code == 2 and "patch image index 3 is out of range: 3 images" in err
    code, _, err = _run([DIGITS_MODEL, digits, "--out", tmp_path / "o5", "--patch", "3"], capsys)
    assert code == 2 and "--patch takes ROW,COL" in err  # argparse's usage error
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_without_matplotlib_names_the_extra(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = _run([DIGITS_MODEL, digits, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert 'error: drawing needs matplotlib, which is not installed: pip install "flexpredict-zoo[viz]"' in err
    assert not (tmp_path / "out").exists()


def test_module_entry_without_matplotlib_prints_one_error_line(digits, tmp_path):
    # `python -m flexpredict_zoo.cli` runs cli.py as __main__, a second copy of the module: the error show raises
    # must still be one of the user errors that copy knows (a class outside the entry module)
    import subprocess
    script = ("import runpy, sys; sys.modules['matplotlib'] = None; "
              "runpy.run_module('flexpredict_zoo.cli', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", script, "show", DIGITS_MODEL, str(digits), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ('error: drawing needs matplotlib, which is not installed: pip install '
                           '"flexpredict-zoo[viz]"\n')
    assert not (tmp_path / "out").exists()
