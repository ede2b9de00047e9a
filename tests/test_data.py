"""train/data.py: augmentation parameters, unreadable images, folder labels, digits split, synthetic data."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from flexpredict_zoo.train import data
from flexpredict_zoo.train.data import (DigitsDataset, ImageFolderDataset, RandomGaussianBlur, SyntheticDataset,
                                        UnreadableImage, build_pretraining_dataset, filter_unreadable,
                                        pretraining_transform)


def data_cfg(**overrides):
    fields = dict(dataset="synthetic", root=None, batch_size=8, num_workers=0, pin_memory=False, crop_scale=(0.3, 1.0),
                  hflip=True, grayscale_p=0.2, blur_p=0.5, blur_radius=(0.1, 2.0), color_jitter=0.0,
                  max_unreadable_fraction=0.01, synthetic_size=16)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def write_image(path, value=128, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_official_augmentations_in_order_with_parameters():
    tf = pretraining_transform(224)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomGrayscale,
                     RandomGaussianBlur, transforms.ToTensor, transforms.Normalize]
    crop, flip, gray, blur, _, norm = tf.transforms
    assert crop.size == (224, 224) and crop.scale == (0.3, 1.0)
    assert crop.interpolation == transforms.InterpolationMode.BILINEAR  # torchvision default, as the official
    assert flip.p == 0.5 and gray.p == 0.2
    assert blur.p == 0.5 and blur.radius == (0.1, 2.0)
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)


def test_transform_options_remove_steps_and_add_jitter():
    tf = pretraining_transform(32, crop_scale=(0.6, 1.0), hflip=False, grayscale_p=0.0, blur_p=0.0)
    assert [type(t) for t in tf.transforms] == [transforms.RandomResizedCrop, transforms.ToTensor, transforms.Normalize]
    assert tf.transforms[0].scale == (0.6, 1.0)
    jitter = pretraining_transform(32, color_jitter=0.5).transforms[2]
    assert isinstance(jitter, transforms.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert cj.brightness == (0.6, 1.4) and cj.hue == (-0.1, 0.1)  # 0.8 s and 0.2 s at s = 0.5


def test_transform_from_config_reads_the_data_fields():
    tf = data.transform_from_config(data_cfg(crop_scale=(0.5, 0.9), hflip=False, blur_p=0.25, blur_radius=(1.0, 3.0)), 48)
    crop, gray, blur = tf.transforms[:3]
    assert crop.size == (48, 48) and crop.scale == (0.5, 0.9)
    assert isinstance(gray, transforms.RandomGrayscale) and blur.p == 0.25 and blur.radius == (1.0, 3.0)


def test_blur_probability_and_radius_range(monkeypatch):
    radii = []
    original = data.ImageFilter.GaussianBlur
    monkeypatch.setattr(data.ImageFilter, "GaussianBlur", lambda radius: radii.append(radius) or original(radius))
    torch.manual_seed(0)
    blur = RandomGaussianBlur(p=0.5, radius=(0.1, 2.0))
    img = Image.new("RGB", (8, 8))
    for _ in range(2000):
        blur(img)
    assert 0.45 < len(radii) / 2000 < 0.55
    assert 0.1 <= min(radii) < 0.2 and 1.9 < max(radii) <= 2.0
    assert abs(np.mean(radii) - 1.05) < 0.06


def test_transform_output_shape_and_normalisation():
    torch.manual_seed(0)
    out = pretraining_transform(32)(Image.new("RGB", (50, 40), (124, 116, 104)))
    assert out.shape == (3, 32, 32)
    # a uniform image equal to the ImageNet mean normalises to about 0 (to within the uint8 rounding)
    assert out.abs().max() < 0.02


def test_folder_labels_from_sorted_class_names(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3), ("moth", 1)):
        for i in range(n):
            write_image(tmp_path / cls / f"{i}.jpg")
    write_image(tmp_path / "ant" / "nested" / "deep.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, transform=transforms.ToTensor())
    assert ds.classes == ["ant", "moth", "zebra"]
    labels = [label for _, label in ds.samples]
    assert labels.count(0) == 4 and labels.count(1) == 1 and labels.count(2) == 2
    img, label = ds[len(ds) - 1]
    assert img.shape == (3, 16, 20) and label == 2


def test_flat_folder_gets_label_minus_one(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.classes == [] and all(ds[i][1] == -1 for i in range(3))


def test_flat_folder_does_not_list_its_hidden_subfolders(tmp_path, monkeypatch):
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    for i in range(50):  # a large hidden subfolder (a cache, a .git), nested, and one that cannot be listed
        write_image(tmp_path / ".cache" / f"{i // 10}" / f"{i}.jpg", size=(2, 2))
    (tmp_path / ".locked").mkdir()
    real, listed = os.scandir, []

    def scandir(path="."):
        listed.append(os.path.realpath(os.fsdecode(path)))
        if listed[-1] == str((tmp_path / ".locked").resolve()):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    ds = ImageFolderDataset(tmp_path)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["0.png", "1.png", "2.png"] and ds.problems == {}
    assert set(listed) <= {str(tmp_path.resolve())}  # the top folder only: nothing below it was listed


def test_empty_or_missing_folder_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_unreadable_images_become_markers_and_are_filtered(tmp_path):
    write_image(tmp_path / "a" / "good.jpg")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good_bytes = (tmp_path / "a" / "good.jpg").read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "truncated.jpg").write_bytes(good_bytes[: len(good_bytes) // 2])
    write_image(tmp_path / "b" / "fine.png")
    ds = ImageFolderDataset(tmp_path, transform=pretraining_transform(16))
    # a DataLoader worker returns the markers instead of dying
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=lambda batch: batch)
    batch = next(iter(loader))
    good, bad = filter_unreadable(batch)
    assert len(good) == 2 and len(bad) == 2
    assert sorted(b.path.rsplit("/", 1)[1] for b in bad) == ["bad.jpg", "truncated.jpg"]
    assert all(isinstance(b, UnreadableImage) and b.error for b in bad)
    assert all(img.shape == (3, 16, 16) for img, _ in good)
    assert filter_unreadable([]) == ([], [])


def test_digits_split_sizes_determinism_and_stratification():
    train, heldout = DigitsDataset("train"), DigitsDataset("heldout")
    assert len(train) == 1297 and len(heldout) == 500
    tr_idx, ho_idx = data.digits_split_indices()
    assert len(set(tr_idx) & set(ho_idx)) == 0 and len(tr_idx) + len(ho_idx) == 1797
    again = data.digits_split_indices.__wrapped__()  # recomputed, not the cached arrays
    assert np.array_equal(again[0], tr_idx) and np.array_equal(again[1], ho_idx)
    counts = np.bincount(heldout.labels.numpy(), minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified: 10% of each class


def test_digits_values_and_shapes():
    ds = DigitsDataset("heldout")
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= label <= 9
    assert ds.pixels.shape == (500, 1, 32, 32)
    assert float(ds.pixels.min()) == 0.0 and float(ds.pixels.max()) == 1.0
    # normalised with the ImageNet mean/std, channel by channel
    expected = (ds.pixels[0, 0] - 0.456) / 0.224
    assert torch.allclose(img[1], expected, atol=1e-6)
    # the 8x8 original is recovered by averaging 4x4 blocks, to within the bilinear smoothing
    from sklearn.datasets import load_digits
    original = load_digits().images[data.digits_split_indices()[1][0]] / 16.0
    assert np.allclose(ds.originals[0].numpy(), original) and ds.originals.shape == (500, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(ds.pixels[:1], 4)[0, 0].numpy()
    assert np.corrcoef(original.ravel(), pooled.ravel())[0, 1] > 0.95


def test_digits_with_transform_and_other_sizes():
    torch.manual_seed(0)
    tf = pretraining_transform(32, crop_scale=(0.6, 1.0), hflip=False, grayscale_p=0, blur_p=0)
    ds = DigitsDataset("train", transform=tf)
    img, _ = ds[3]
    assert img.shape == (3, 32, 32)
    # grey input stays grey: the three channels agree after undoing the normalisation
    assert torch.allclose(img[0] * 0.229 + 0.485, img[2] * 0.225 + 0.406, atol=1e-5)
    assert DigitsDataset("heldout", img_size=48)[0][0].shape == (3, 48, 48)
    with pytest.raises(ValueError, match="heldout"):
        DigitsDataset("test")


def test_synthetic_is_deterministic():
    ds = SyntheticDataset(5, img_size=8, num_classes=3, seed=7)
    a, la = ds[4]
    b, lb = SyntheticDataset(5, img_size=8, num_classes=3, seed=7)[4]
    assert torch.equal(a, b) and la == lb == 1 and a.shape == (3, 8, 8)
    assert not torch.equal(ds[0][0], ds[1][0])
    with pytest.raises(IndexError):
        ds[5]


def test_build_pretraining_dataset_for_each_kind(tmp_path):
    syn = build_pretraining_dataset(data_cfg(synthetic_size=12), 16)
    assert len(syn) == 12 and syn[0][0].shape == (3, 16, 16)
    digits = build_pretraining_dataset(data_cfg(dataset="digits", hflip=False, blur_p=0.0), 32)
    assert len(digits) == 1297 and isinstance(digits.transform.transforms[0], transforms.RandomResizedCrop)
    assert len(build_pretraining_dataset(data_cfg(dataset="digits"), 32, train=False)) == 500
    for split in ("train", "val"):
        write_image(tmp_path / split / "cat" / "0.jpg", size=(40, 30))
    write_image(tmp_path / "train" / "dog" / "0.jpg")
    folder = build_pretraining_dataset(data_cfg(dataset="folder", root=str(tmp_path)), 24)
    assert folder.classes == ["cat", "dog"] and folder[0][0].shape == (3, 24, 24)
    val = build_pretraining_dataset(data_cfg(dataset="folder", root=str(tmp_path)), 24, train=False)
    assert val.classes == ["cat"] and val[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="data.root"):
        build_pretraining_dataset(data_cfg(dataset="folder"), 24)
    with pytest.raises(ValueError, match="folder, digits, synthetic"):
        build_pretraining_dataset(data_cfg(dataset="imagenet"), 24)


class Textured(torch.utils.data.Dataset):
    """PIL images with texture, through the official augmentations (every random step on)."""

    def __init__(self, count=6, size=48):
        rng = np.random.default_rng(1)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(count)]
        self.transform = pretraining_transform(24)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index


def test_seeded_samples_depend_only_on_seed_epoch_and_index():
    from flexpredict_zoo.train.distributed import SampleKey
    key = SampleKey(epoch=2, index=3, position=5)
    first = data.SeededSamples(Textured(), seed=7)[key]
    assert first[0] == key and first[1][1] == 3
    torch.rand(100), np.random.rand(10)  # other draws in between change nothing
    again = data.SeededSamples(Textured(), seed=7)[SampleKey(epoch=2, index=3, position=0)]
    assert torch.equal(first[1][0], again[1][0])  # the position (and the process) does not matter
    next_epoch = data.SeededSamples(Textured(), seed=7)[SampleKey(epoch=3, index=3, position=5)]
    other_seed = data.SeededSamples(Textured(), seed=8)[key]
    assert not torch.equal(first[1][0], next_epoch[1][0]) and not torch.equal(first[1][0], other_seed[1][0])
    # in a DataLoader worker: the same tensor as in the main process
    loader = DataLoader(data.SeededSamples(Textured(), seed=7), sampler=[key], num_workers=1, collate_fn=lambda b: b)
    assert torch.equal(next(iter(loader))[0][1][0], first[1][0])


def test_seeded_samples_leave_the_global_rngs_as_they_were():
    from flexpredict_zoo.train.distributed import SampleKey
    torch.manual_seed(0), np.random.seed(0)
    import random
    random.seed(0)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(0), np.random.seed(0)
    random.seed(0)
    data.SeededSamples(Textured(), seed=7)[SampleKey(0, 1, 0)]
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(), random.random()) == expected[1:]


def test_collate_draws_the_masks_of_the_batch_iteration():
    from flexpredict_zoo.train.distributed import SampleKey
    from flexpredict_zoo.train.masks import MaskConfig, MultiBlockMaskCollator
    collator = MultiBlockMaskCollator(MaskConfig(input_size=32, patch_size=4, min_keep=4), seed=5)
    collate = data.CollateWithUnreadable(collator, batch_size=2, iterations_per_epoch=3)
    items = [(SampleKey(epoch=2, index=i, position=2 + i), (torch.zeros(3), i)) for i in range(2)]
    items.append((SampleKey(epoch=2, index=9, position=4), UnreadableImage("x.jpg", "truncated")))
    (images, labels), context_masks, target_masks, bad, iteration = collate(items)
    assert iteration == 2 * 3 + 2 // 2 == 7 and bad == [("x.jpg", "truncated")] and labels.tolist() == [0, 1]
    expected_context, expected_targets = MultiBlockMaskCollator(collator.cfg, seed=5).sample(2, counter=7)
    assert torch.equal(context_masks[0], expected_context[0])
    assert all(torch.equal(t, e) for t, e in zip(target_masks, expected_targets))
    assert not torch.equal(context_masks[0], collator.sample(2, counter=8)[0][0])
