"""The one image walk and the one image reader, as extraction and training see them: symbolic links, link
loops, broken links, unlistable folders, FIFOs; 16-bit and float images scaled, not clipped."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo.features import extract_features, find_images, read_image, walk_images
from flexpredict_zoo.train.data import ImageFolderDataset
from flexpredict_zoo.train.gpu_data import JpegBytesDataset, decode_images


def _picture(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_picture(seed)).save(path)


def _unlistable(monkeypatch, folder: Path) -> None:
    """`folder` cannot be listed: chmod 000 where that binds (not for root), else the listing call refuses."""
    if os.geteuid() != 0:
        folder.chmod(0)
        return
    real = os.scandir

    def scandir(path="."):
        if Path(os.path.realpath(os.fsdecode(path))) == folder.resolve():  # by any path, as permissions do
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture
def odd_folder(tmp_path, monkeypatch):
    """root/ with: a.jpg, sub/b.png, linked -> ../outside (c.jpg inside), again -> ../outside (the same folder
    through a second link), up -> . (a loop), broken.jpg -> nothing, loop.jpg -> loop.jpg, fifo.jpg (a FIFO),
    locked/ (cannot be listed, holds d.jpg)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    _save(root / "a.jpg", 1)
    _save(root / "sub" / "b.png", 2)
    _save(outside / "c.jpg", 3)
    _save(root / "locked" / "d.jpg", 4)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "zz_again").symlink_to(outside, target_is_directory=True)
    (root / "up").symlink_to(root, target_is_directory=True)
    (root / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    os.mkfifo(root / "fifo.jpg")
    _unlistable(monkeypatch, root / "locked")
    yield root
    (root / "locked").chmod(0o755)


EXPECTED_PROBLEMS = {"broken.jpg": "broken symbolic link to", "loop.jpg": "symbolic link loop",
                     "fifo.jpg": "not a regular file", "locked/": "cannot list folder: Permission denied"}


def test_the_walk_follows_linked_folders_once_and_names_every_problem(odd_folder):
    files = find_images(odd_folder)
    readable = [f.name for f in files if f.problem is None]
    assert readable == ["a.jpg", "linked/c.jpg", "sub/b.png"]  # the second link and the loop are not walked again
    problems = {f.name: f.problem for f in files if f.problem is not None}
    assert set(problems) == set(EXPECTED_PROBLEMS)
    for name, start in EXPECTED_PROBLEMS.items():
        assert problems[name].startswith(start), (name, problems[name])


def test_the_walk_without_recursion_lists_the_top_folder_only(odd_folder):
    files = walk_images(odd_folder, recursive=False)
    assert [f.name for f in files if f.problem is None] == ["a.jpg"]  # not sub/, linked/ nor the loop through up/
    problems = {f.name: f.problem for f in files if f.problem is not None}
    assert set(problems) == {"broken.jpg", "loop.jpg", "fifo.jpg"}  # locked/ is not listed, so not reported
    for name in problems:
        assert problems[name].startswith(EXPECTED_PROBLEMS[name]), (name, problems[name])


def test_extraction_reads_or_names_every_file(odd_folder):
    torch.manual_seed(0)
    model = timm.create_model("flexpredict_vit_ti16", pretrained=False, depth=1, img_size=32).eval()
    result = extract_features(model, odd_folder, batch_size=4, num_workers=0, device="cpu")
    assert result.names == ["a.jpg", "linked/c.jpg", "sub/b.png"]
    skipped = dict(result.skipped)
    assert set(skipped) == set(EXPECTED_PROBLEMS)
    assert all(skipped[name].startswith(start) for name, start in EXPECTED_PROBLEMS.items())


def test_training_folder_counts_the_same_files(odd_folder, tmp_path):
    # class layout: data/cls -> the odd folder (a linked class folder) and data/other with one image
    data = tmp_path / "data"
    data.mkdir()
    (data / "cls").symlink_to(odd_folder, target_is_directory=True)
    _save(data / "other" / "e.jpg", 5)
    for dataset in (ImageFolderDataset(data), JpegBytesDataset(data)):
        assert len(dataset) == 8  # 3 readable + 4 problems in cls, 1 in other
        items = [dataset[i] for i in range(len(dataset))]
        unreadable = {Path(item.path).name: item.error for item in items if hasattr(item, "error")}
        assert set(unreadable) == {"broken.jpg", "loop.jpg", "fifo.jpg", "locked"}
        assert unreadable["loop.jpg"] == "symbolic link loop"
        assert len(items) - len(unreadable) == 4


# ---------------------------------------------------------------------------------------- bit depths

def _png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2, big-endian samples."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def bit_depths(tmp_path):
    """The same pictures in 8 bits and in 16-bit / float forms that hold exactly the same values."""
    grey8 = _picture(7)[..., 0]
    rgb8 = _picture(8)
    folder = tmp_path / "depths"
    folder.mkdir()
    Image.fromarray(grey8, "L").save(folder / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "grey16.png")  # I;16
    Image.fromarray(grey8.astype(np.float32) / 255.0, "F").save(folder / "greyf.tif")
    Image.fromarray(rgb8).save(folder / "rgb8.png")
    (folder / "rgb16.png").write_bytes(_png_16bit_rgb(rgb8.astype(np.uint16) * 257))
    Image.fromarray(np.full((8, 8), 3.5, np.float32), "F").save(folder / "hdr.tif")
    return folder


def test_16_bit_and_float_images_read_as_their_8_bit_twins(bit_depths):
    grey8 = np.asarray(read_image(bit_depths / "grey8.png"))
    with Image.open(bit_depths / "grey16.png") as raw:
        assert raw.mode.startswith("I")  # what PIL's convert("RGB") clipped: 99% of such pixels turned white
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.9
    assert np.array_equal(np.asarray(read_image(bit_depths / "grey16.png")), grey8)
    assert np.array_equal(np.asarray(read_image(bit_depths / "greyf.tif")), grey8)
    assert np.array_equal(np.asarray(read_image(bit_depths / "rgb16.png")), np.asarray(read_image(bit_depths / "rgb8.png")))
    with pytest.raises(ValueError, match=r"floating-point image with values in \[3.5, 3.5\].*8- or 16-bit"):
        read_image(bit_depths / "hdr.tif")


def test_same_features_in_8_and_16_bits_and_the_same_pixels_on_every_training_path(bit_depths):
    torch.manual_seed(0)
    model = timm.create_model("flexpredict_vit_ti16", pretrained=False, depth=1, img_size=32).eval()
    result = extract_features(model, bit_depths, batch_size=8, num_workers=0, device="cpu")
    rows = dict(zip(result.names, result.pooled))
    assert torch.equal(rows["grey16.png"], rows["grey8.png"]) and torch.equal(rows["greyf.tif"], rows["grey8.png"])
    assert torch.equal(rows["rgb16.png"], rows["rgb8.png"])
    assert dict(result.skipped)["hdr.tif"].startswith("ValueError: a floating-point image")

    cpu = ImageFolderDataset(bit_depths)  # the training CPU path
    pixels = {Path(p).name: np.asarray(cpu[i][0]) for i, (p, _) in enumerate(cpu.samples) if "hdr" not in p}
    assert np.array_equal(pixels["grey16.png"], pixels["grey8.png"])
    raw = JpegBytesDataset(bit_depths)  # the GPU path's workers, then its decoder (here on the CPU)
    items = [raw[i] for i in range(len(raw))]
    decoded, kept, bad = decode_images([item[0] for item in items], "cpu", names=[item[2] for item in items])
    by_name = {Path(items[k][2]).name: image for k, image in zip(kept, decoded)}
    assert torch.equal(by_name["grey16.png"], by_name["grey8.png"]) and torch.equal(by_name["rgb16.png"], by_name["rgb8.png"])
    assert by_name["grey8.png"].dtype == torch.uint8
    assert [Path(b.path).name for b in bad] == ["hdr.tif"] and "floating-point" in bad[0].error
