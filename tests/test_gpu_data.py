"""GPU decode-and-augment path, exercised on CPU (torchvision decodes on CPU when device is cpu)."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from flexpredict_zoo.train.data import IMAGENET_MEAN, IMAGENET_STD, UnreadableImage
from flexpredict_zoo.train.gpu_data import (AugmentParams, GpuAugment, GpuDecodeLoader, JpegBatchCollator,
                                            JpegBytesDataset, build_gpu_loader, decode_images, gaussian_blur,
                                            sample_crop_boxes)


def _smooth_image(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _jpeg_bytes(image, quality=95):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.jpg").write_bytes(_jpeg_bytes(_smooth_image(48 + 8 * i, 64, seed=i + 10 * len(c))))
    _smooth_image(40, 40, seed=99).save(root / "dog" / "png_image.png")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    return root


def test_dataset_reads_bytes_and_reports_empty_file(folder):
    ds = JpegBytesDataset(folder)
    items = [ds[i] for i in range(len(ds))]
    bad = [it for it in items if isinstance(it, UnreadableImage)]
    assert len(ds) == 9
    assert [b.path.endswith("empty.jpg") for b in bad] == [True]
    good = [it for it in items if not isinstance(it, UnreadableImage)]
    assert all(t.dtype == torch.uint8 and t.ndim == 1 for t, _, _ in good)
    assert sorted({label for _, label, _ in good}) == [0, 1]
    path, label = ds.samples[0]
    assert torch.equal(good[0][0], torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


def test_decode_reports_corrupt_jpeg_and_decodes_png(folder):
    ds = JpegBytesDataset(folder)
    items = [(ds[i], str(ds.samples[i][0])) for i in range(len(ds))]
    readable = [(it[0], name) for it, name in items if not isinstance(it, UnreadableImage)]
    images, kept, bad = decode_images([d for d, _ in readable], "cpu", names=[n for _, n in readable])
    assert len(images) == 7 and len(kept) == 7
    assert len(bad) == 1 and bad[0].path.endswith("corrupt.jpg") and bad[0].error
    png_index = [n for _, n in readable].index(next(n for _, n in readable if n.endswith(".png")))
    png = images[kept.index(png_index)]
    expected = torch.from_numpy(np.array(Image.open(readable[png_index][1]).convert("RGB"))).permute(2, 0, 1)
    assert png.dtype == torch.uint8 and torch.equal(png, expected)
    assert all(im.shape[0] == 3 for im in images)


def test_output_shape_dtype_range_and_seed_reproducibility():
    images = [TF.pil_to_tensor(_smooth_image(h, w, seed=h)) for h, w in [(48, 64), (64, 40), (37, 91), (50, 50)]]
    out = GpuAugment(img_size=32, seed=3)(images)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    low, high = (0 - mean) / std, (1 - mean) / std
    assert bool(((out >= low - 1e-5) & (out <= high + 1e-5)).all())
    assert torch.equal(out, GpuAugment(img_size=32, seed=3)(images))
    assert not torch.equal(out, GpuAugment(img_size=32, seed=4)(images))


def test_random_draw_frequencies():
    aug = GpuAugment(img_size=224, seed=0)
    n = 20000
    p = aug.sample_params([(375, 500)] * n)
    for name, frac, expected in [("flip", p.flip.float().mean(), 0.5), ("grayscale", p.grayscale.float().mean(), 0.2),
                                 ("blur", p.blur.float().mean(), 0.5)]:
        tolerance = 4 * math.sqrt(expected * (1 - expected) / n)
        assert abs(float(frac) - expected) < tolerance, (name, float(frac))
    assert float(p.sigma.min()) >= 0.1 and float(p.sigma.max()) <= 2.0
    assert abs(float(p.sigma.mean()) - 1.05) < 4 * (1.9 / math.sqrt(12)) / math.sqrt(n)
    off = GpuAugment(img_size=224, hflip=False, grayscale_p=0.0, blur_p=0.0, seed=0).sample_params([(10, 10)] * 500)
    assert not off.flip.any() and not off.grayscale.any() and not off.blur.any()


def test_crop_boxes_area_and_ratio_match_torchvision():
    g = torch.Generator().manual_seed(0)
    n = 4000
    boxes = sample_crop_boxes([(375, 500)] * n, (0.3, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.T.double()
    area = h * w / (375 * 500)
    # rounding of h and w moves the area fraction by at most about 1/h + 1/w of itself
    assert float(area.min()) >= 0.3 * (1 - 2 / 190) and float(area.max()) <= 1.0
    assert float((w / h).min()) >= 0.75 * (1 - 2 / 190) and float((w / h).max()) <= 4 / 3 * (1 + 2 / 190)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all())
    # same distribution as torchvision's sampler
    torch.manual_seed(0)
    from torchvision.transforms import RandomResizedCrop
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.3, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ref_area = ref[:, 2] * ref[:, 3] / (375 * 500)
    assert abs(float(area.mean()) - float(ref_area.mean())) < 0.02
    assert abs(float(top.mean() / (375 - h).clamp(min=1).mean()) - 0.5) < 0.05


def test_crop_fallback_is_torchvision_central_crop():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = sample_crop_boxes([(10, 1000)], (0.3, 1.0), (3 / 4, 4 / 3), g)[0].tolist()
    assert (top, left, h, w) == (0, (1000 - 13) // 2, 10, 13)


def _reference(image, box, flip, gray, sigma, size):
    """Straightforward per-image pipeline: torchvision resized_crop, hflip, grayscale, dense 2-D Gaussian."""
    top, left, h, w = box
    x = TF.resized_crop(image.float(), top, left, h, w, [size, size], antialias=True).clamp(0, 255)
    if flip:
        x = TF.horizontal_flip(x)
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if sigma is not None:
        r = 6
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        yy, xx = torch.meshgrid(t, t, indexing="ij")
        k2 = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
        k2 = (k2 / k2.sum())[None, None].repeat(3, 1, 1, 1)
        x = F.conv2d(F.pad(x[None], (r, r, r, r), mode="replicate"), k2, groups=3)[0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x / 255 - mean) / std


def test_equals_reference_for_fixed_crop_boxes():
    images = [TF.pil_to_tensor(_smooth_image(60, 80, seed=1)), TF.pil_to_tensor(_smooth_image(90, 70, seed=2)),
              TF.pil_to_tensor(_smooth_image(50, 50, seed=3))]
    params = AugmentParams(boxes=torch.tensor([[5, 7, 40, 50], [0, 0, 90, 70], [10, 3, 20, 33]]),
                           flip=torch.tensor([True, False, True]), grayscale=torch.tensor([False, True, True]),
                           blur=torch.tensor([True, False, True]), sigma=torch.tensor([1.7, 0.5, 0.3]))
    out = GpuAugment(img_size=24)(images, params)
    for i, image in enumerate(images):
        sigma = float(params.sigma[i]) if params.blur[i] else None
        ref = _reference(image, params.boxes[i].tolist(), bool(params.flip[i]), bool(params.grayscale[i]), sigma, 24)
        assert (out[i] - ref).abs().max().item() < 1e-4, i


def test_blur_sigma_means_pil_radius():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))  # noise: blur matters most
    x = TF.pil_to_tensor(image).float()[None]
    for radius in (0.5, 1.0, 2.0):
        pil = TF.pil_to_tensor(image.filter(ImageFilter.GaussianBlur(radius=radius))).float()

        def error(sigma):
            return (gaussian_blur(x, torch.tensor([sigma]), half_width=8)[0] - pil).abs().mean().item()

        # PIL approximates the Gaussian with box blurs and rounds to 8 bits: within one grey level on average
        # (edges included, as both replicate edge pixels), and sigma = radius fits better than 0.7x or 1.4x it
        assert error(radius) < 1.0, radius
        assert error(radius) < min(error(0.7 * radius), error(1.4 * radius)), radius


class _FakeMasks:
    """Stand-in for the multi-block collator's sample(batch_size): deterministic index masks."""

    def sample(self, batch_size):
        context = torch.arange(batch_size * 6).reshape(batch_size, 6) % 16
        targets = [torch.arange(batch_size * 3).reshape(batch_size, 3) % 16 + k for k in range(2)]
        return [context], targets


def test_loader_drops_unreadable_keeps_mask_rows(folder):
    reported = []
    loader = build_gpu_loader(folder, batch_size=9, augment=GpuAugment(img_size=16, seed=0), device="cpu",
                              mask_collator=_FakeMasks(), num_workers=0, shuffle=False, on_unreadable=reported.extend)
    (images, labels, context_masks, target_masks), = list(loader)
    assert images.shape == (7, 3, 16, 16)
    assert sorted(b.path.rsplit("/", 1)[-1] for b in reported) == ["corrupt.jpg", "empty.jpg"]
    assert labels.tolist() == [0] * 3 + [1] * 4
    # masks were sampled for the 8 readable files; the row of the corrupt one (sorted position 3) is removed
    full = _FakeMasks().sample(8)
    rows = [0, 1, 2, 4, 5, 6, 7]
    assert torch.equal(context_masks[0], full[0][0][rows]) and torch.equal(target_masks[1], full[1][1][rows])


def test_collator_without_masks_and_empty_batch():
    data, labels, context, targets, bad, paths = JpegBatchCollator()([UnreadableImage("a.jpg", "x")])
    assert data == [] and paths == [] and labels.numel() == 0 and context == [] and targets == [] and len(bad) == 1
    with pytest.raises(ValueError, match="colour jitter"):
        GpuAugment(color_jitter=0.4)
