"""GPU decode-and-augment path, exercised on CPU (torchvision decodes on CPU when device is cpu), and the trainer
with data.decode=gpu."""
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from flexpredict_zoo.train import cli as train_cli
from flexpredict_zoo.train.config import ConfigError, from_dict
from flexpredict_zoo.train.data import IMAGENET_MEAN, IMAGENET_STD, UnreadableImage
from flexpredict_zoo.train.engine import Trainer, train
from flexpredict_zoo.train.data import CollateWithUnreadable, pretraining_loader
from flexpredict_zoo.train.distributed import ResumableDistributedSampler, SampleKey
from flexpredict_zoo.train.gpu_data import (DECODE_ON_CPU_ENV, AugmentParams, GpuAugment, JpegBytesDataset,
                                            collate_jpeg_bytes, decode_and_augment, decode_images, gaussian_blur,
                                            sample_crop_boxes)
from flexpredict_zoo.train.masks import derive_seed
from flexpredict_zoo.train.run_checkpoint import load_checkpoint


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
    assert torch.equal(good[0][0], torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8))
    assert good[0][1:] == (label, path)


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
    """Stand-in for the multi-block collator's sample(batch_size, counter): deterministic index masks."""

    def sample(self, batch_size, counter=0):
        context = torch.arange(batch_size * 6).reshape(batch_size, 6) % 16
        targets = [torch.arange(batch_size * 3).reshape(batch_size, 3) % 16 + k for k in range(2)]
        return [context], targets


def test_loader_drops_unreadable_keeps_mask_rows(folder):
    # the trainer's data.decode=gpu path (engine.Trainer.batches): pretraining_loader over the file bytes, then
    # decode_and_augment on the device (here the CPU decoder)
    ds = JpegBytesDataset(folder)
    loader = pretraining_loader(ds, ResumableDistributedSampler(ds, 1, 0, shuffle=False), _FakeMasks(), batch_size=9,
                                iterations_per_epoch=1, num_workers=0, seed=0, collate=collate_jpeg_bytes)
    ((data, labels, paths), context_masks, target_masks, bad, iteration), = list(loader)
    images, context_masks, target_masks, kept, undecodable = decode_and_augment(
        data, paths, context_masks, target_masks, GpuAugment(img_size=16, seed=0), "cpu", seed=0)
    assert images.shape == (7, 3, 16, 16) and iteration == 0
    reported = [path for path, _ in bad] + [u.path for u in undecodable]
    assert sorted(p.rsplit("/", 1)[-1] for p in reported) == ["corrupt.jpg", "empty.jpg"]
    assert labels[kept].tolist() == [0] * 3 + [1] * 4
    # masks were sampled for the 8 readable files; the row of the corrupt one (sorted position 3) is removed
    full = _FakeMasks().sample(8)
    rows = [0, 1, 2, 4, 5, 6, 7]
    assert kept == rows
    assert torch.equal(context_masks[0], full[0][0][rows]) and torch.equal(target_masks[1], full[1][1][rows])


def test_file_bytes_cross_from_workers_packed_in_one_tensor(tmp_path):
    # a batch of file bytes leaves a DataLoader worker as one uint8 buffer and its lengths (not a tensor per file,
    # which made the main process receive one shared-memory file per image); unpacked, each file's bytes are exact
    from torch.utils.data import DataLoader
    from flexpredict_zoo.train.gpu_data import PackedBytes
    root = _training_folder(tmp_path / "images", good=9)
    ds = JpegBytesDataset(root)
    readable = [i for i in range(len(ds)) if not isinstance(ds[i], UnreadableImage)]
    loader = DataLoader(torch.utils.data.Subset(ds, readable), batch_size=4, num_workers=2,
                        collate_fn=collate_jpeg_bytes)
    seen = 0
    for packed, labels, paths in loader:
        assert isinstance(packed, PackedBytes) and packed.buffer.dtype == torch.uint8 and len(packed) == len(paths)
        assert [bytes(t.numpy()) for t in packed.unpack()] == [Path(p).read_bytes() for p in paths]
        seen += len(paths)
    assert seen == len(readable) >= 9
    assert PackedBytes([]).unpack() == [] and len(PackedBytes([])) == 0


def test_collate_of_an_unreadable_batch_and_colour_jitter_refused():
    collate = CollateWithUnreadable(_FakeMasks(), batch_size=1, iterations_per_epoch=1, collate=collate_jpeg_bytes)
    data, context, targets, bad, iteration = collate([(SampleKey(0, 0, 0), UnreadableImage("a.jpg", "x"))])
    assert data is None and context is None and targets is None and bad == [("a.jpg", "x")] and iteration == 0
    with pytest.raises(ValueError, match="colour jitter"):
        GpuAugment(color_jitter=0.4)


# ------------------------------------------------------------------------- the trainer with data.decode=gpu
# On CPU with the CPU decoder (gpu_data.DECODE_ON_CPU_ENV, for tests only): the same code as on a CUDA device.


def _training_folder(root, good=14):
    """`good` JPEGs and PNGs of different sizes in two class folders, and six files no path can read."""
    rng = np.random.default_rng(0)
    for i in range(good):
        size = (40 + 4 * (i % 5), 32 + 6 * (i % 3))
        image = Image.fromarray(rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8))
        target = root / f"class_{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        image.resize(size, Image.BILINEAR).save(target / f"img_{i:02d}.{'jpg' if i % 3 else 'png'}")
    jpeg = _jpeg_bytes(_smooth_image(48, 64, seed=5))
    bad = root / "class_0"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (bad / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (bad / "text.jpg").write_text("not an image at all\n")
    (bad / "broken.jpg").symlink_to(root / "missing.jpg")
    (bad / "loop.jpg").symlink_to(bad / "loop.jpg")
    return root


UNREADABLE = {"empty.jpg", "corrupt.jpg", "truncated.jpg", "text.jpg", "broken.jpg", "loop.jpg"}


def _folder_cfg(run_dir, root, decode, **sections):
    base = {
        "model": {"name": "flexpredict_vit_m4_32", "img_size": 32, "kwargs": {"depth": 2, "embed_dim": 64}},
        "predictor": {"depth": 1, "embed_dim": 32, "num_heads": 4},
        "mask": {"min_keep": 4},
        "data": {"dataset": "folder", "root": str(root), "batch_size": 4, "num_workers": 2, "decode": decode},
        "optim": {"epochs": 3, "warmup_epochs": 1, "lr_peak": 1e-3},
        "run": {"output_dir": str(run_dir), "log_every": 1, "checkpoint_every": 100, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name] = dict(base[name], **values)
    return from_dict(base)


@pytest.fixture
def decode_on_cpu(monkeypatch):
    monkeypatch.setenv(DECODE_ON_CPU_ENV, "1")


def test_gpu_decode_names_and_counts_the_unreadable_files_as_the_cpu_path(tmp_path, decode_on_cpu):
    root = _training_folder(tmp_path / "images")  # 20 files, batch 4: one epoch visits every file
    found = {}
    for decode in ("cpu", "gpu"):
        cfg = _folder_cfg(tmp_path / decode, root, decode, optim={"epochs": 1}, data={"max_unreadable_fraction": 0.5})
        trainer = Trainer(cfg)
        summary = trainer.fit()
        assert summary["iterations"] == 5 and summary["unreadable_images"] == 6, decode
        found[decode] = dict(trainer.unreadable)
        log = (tmp_path / decode / "train.log").read_text()
        for path in trainer.unreadable:  # each named once in the log, with its reason
            assert log.count(f"skipped unreadable image {path}: ") == 1, (decode, path)
    assert {Path(p).name for p in found["gpu"]} == UNREADABLE
    assert found["gpu"].keys() == found["cpu"].keys()  # the same paths, as strings
    for name in ("broken.jpg", "loop.jpg"):  # problems of the folder walk: the same reason on both paths
        path = next(p for p in found["cpu"] if p.endswith(name))
        assert found["gpu"][path] == found["cpu"][path]
    assert found["gpu"][next(p for p in found["gpu"] if p.endswith("empty.jpg"))] == "file has 0 bytes, not an image"


def test_gpu_decode_resumes_with_workers_on_the_same_trajectory(tmp_path, decode_on_cpu):
    root = _training_folder(tmp_path / "images", good=12)
    for path in root.glob("class_0/*.jpg"):  # readable files only: 12 images / batch 4 = 3 iterations per epoch
        if path.name in UNREADABLE:
            path.unlink()
    straight_trainer = Trainer(_folder_cfg(tmp_path / "a", root, "gpu", run={"max_steps": 7}))
    assert straight_trainer.gpu_augment is not None and straight_trainer.iterations_per_epoch == 3
    straight = straight_trainer.fit()
    # stopped at 2 (mid-epoch 0) and at 5 (mid-epoch 1); the resumed runs cross the epoch boundaries at 3 and 6
    parts = [train(_folder_cfg(tmp_path / "b", root, "gpu", run={"max_steps": steps})) for steps in (2, 5, 7)]
    assert [p["steps_this_run"] for p in parts] == [2, 3, 2] and parts[2]["resumed_from"].endswith("latest.pt")
    assert len(straight["losses"]) == 7 and len(set(straight["losses"])) == 7
    assert parts[0]["losses"] + parts[1]["losses"] + parts[2]["losses"] == straight["losses"]  # bit-identical
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert a["iteration"] == b["iteration"] == 7
    compared = 0
    for key in ("encoder", "target_encoder", "predictor"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
            compared += 1
    assert compared > 30
    # the device augmentations are drawn per iteration: another seed gives another trajectory from the same weights
    other = train(_folder_cfg(tmp_path / "c", root, "gpu", run={"max_steps": 2, "seed": 1}))
    assert other["losses"] != straight["losses"][:2]


def test_gpu_batches_are_the_decoded_files_augmented_with_the_iteration_seed(tmp_path, decode_on_cpu):
    root = _training_folder(tmp_path / "images", good=8)
    for path in root.glob("class_0/*.jpg"):
        if path.name in UNREADABLE:
            path.unlink()
    trainer = Trainer(_folder_cfg(tmp_path / "run", root, "gpu", data={"num_workers": 0}))
    first = [images for images, _, _ in trainer.batches(epoch=1)]
    again = [images for images, _, _ in trainer.batches(epoch=1, start_batch=1)]
    assert len(first) == 2 and first[0].shape == (4, 3, 32, 32) and torch.equal(again[0], first[1])
    # by hand: the sampler's files of iteration 1 * 2 + 1 = 3, decoded, augmented with the (seed, rank, iteration) draws
    trainer.sampler.set_epoch(1)
    trainer.sampler.set_start_index(0)
    keys = list(trainer.sampler)[4:8]
    images = [TF.pil_to_tensor(Image.open(trainer.dataset.samples[k.index][0]).convert("RGB")) for k in keys]
    expected = GpuAugment(img_size=32)(images, seed=derive_seed(0, 0, 3, "gpu-augment"))
    assert torch.equal(first[1], expected)
    trainer.close()


def test_gpu_decode_without_cuda_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DECODE_ON_CPU_ENV, raising=False)
    root = _training_folder(tmp_path / "images", good=4)
    with pytest.raises(ConfigError, match=r"data.decode=gpu decodes and augments on a CUDA GPU .* device is cpu.*"
                                          r"use data.decode=cpu"):
        Trainer(_folder_cfg(tmp_path / "run", root, "gpu"))
    assert not (tmp_path / "run").exists()  # the failed start left no run folder
    code = train_cli.main(["--config", "tiny_cpu", "data.dataset=folder", f"data.root={root}", "data.decode=gpu",
                           "run.device=cpu", f"run.output_dir={tmp_path / 'cli'}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: data.decode=gpu decodes and augments on a CUDA GPU" in err and "Traceback" not in err


def test_gpu_decode_with_a_torchvision_without_jpeg_decoder_is_a_clear_error(tmp_path, monkeypatch):
    # torchvision 0.29 deprecated its image decoders (for TorchCodec's): a release without decode_jpeg is refused
    # before anything is built, with what to do
    import torchvision.io
    monkeypatch.setenv(DECODE_ON_CPU_ENV, "1")
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    root = _training_folder(tmp_path / "images", good=4)
    with pytest.raises(ConfigError, match=r"torchvision.io.decode_jpeg \(nvJPEG\), which torchvision \S+ does not "
                                          r"have .* or use data.decode=cpu"):
        Trainer(_folder_cfg(tmp_path / "run", root, "gpu"))
    assert not (tmp_path / "run").exists()


def test_decode_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="'data.decode' must be one of 'cpu', 'gpu', got 'nvjpeg'"):
        _folder_cfg(tmp_path, tmp_path, "nvjpeg")
    with pytest.raises(ConfigError, match="data.dataset=synthetic has none; use data.decode=cpu"):
        from_dict({"data": {"dataset": "synthetic", "decode": "gpu"}})
    with pytest.raises(ConfigError, match="data.decode=gpu has no colour jitter"):
        _folder_cfg(tmp_path, tmp_path, "gpu", data={"color_jitter": 0.4})
    assert from_dict({"data": {"dataset": "synthetic"}}).data.decode == "cpu"  # the default


def test_prefetch_keeps_order_raises_the_threads_errors_and_stops_when_the_loop_breaks():
    import threading
    from flexpredict_zoo.train.gpu_data import prefetch
    seen = []

    def prepare(x):
        seen.append(threading.current_thread().name)
        if x == 7:
            raise ValueError("item 7 is corrupt")
        return x * 10
    assert list(prefetch(iter(range(5)), prepare, "cpu", depth=2)) == [0, 10, 20, 30, 40]
    assert set(seen) == {"flexpredict-prefetch"}  # prepared in the background thread
    seen.clear()
    assert list(prefetch(iter(range(5)), prepare, "cpu", depth=0)) == [0, 10, 20, 30, 40]
    assert set(seen) == {threading.current_thread().name}  # depth 0: in the caller
    with pytest.raises(ValueError, match="item 7 is corrupt"):
        list(prefetch(iter(range(10)), prepare, "cpu", depth=1))
    consumed = []

    def endless():
        i = 0
        while True:
            consumed.append(i)
            yield i
            i += 1
    for value in prefetch(endless(), lambda x: x, "cpu", depth=2):
        if value == 3:
            break  # the generator is closed: the thread must stop, not run on
    assert not any(t.name == "flexpredict-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(consumed) <= 3 + 2 + 2  # at most depth items ahead (plus the one in hand)
