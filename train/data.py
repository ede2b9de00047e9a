"""Pretraining and evaluation datasets: image folders, scikit-learn's digits, synthetic tensors.

Items are `(image_tensor, label)`. A folder image that cannot be decoded comes back as an
`UnreadableImage(path, error)` instead of raising, so one bad JPEG never kills a DataLoader worker;
the collate step separates them with `filter_unreadable` and the trainer counts and logs them.
The pretraining loader (`pretraining_loader`) reads them through `SeededSamples`: every random draw of a sample is
a function of (seed, epoch, index), and the masks of a batch of its iteration, whichever worker draws them.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import transforms

from flexpredict_zoo.features import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, UnreadableImage,  # noqa: F401
                                      eval_transform, read_image, walk_images)  # (re-exported)

from .masks import derive_seed

IMG_EXTENSIONS = IMAGE_EXTENSIONS  # the zoo's one list: what extraction reads is what training and eval read

# scikit-learn's digits: 1,797 images of 8x8 grey values 0..16, 10 classes. A stratified split with a fixed
# seed gives 1,297 training and 500 held-out images, identical on every machine.
DIGITS_HELDOUT = 500
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_CLASSES = 10


def filter_unreadable(batch: Sequence[Any]) -> Tuple[List[Any], List[UnreadableImage]]:
    """Split a list of samples into the readable ones and the UnreadableImage markers."""
    good, bad = [], []
    for sample in batch:
        (bad if isinstance(sample, UnreadableImage) else good).append(sample)
    return good, bad


# ----------------------------------------------------------------------------------------------- transforms
class RandomGaussianBlur:
    """PIL Gaussian blur applied with probability p, radius drawn uniformly from `radius` (as the official
    I-JEPA/StoP transform). Draws from torch's RNG, as the torchvision transforms beside it, so SeededSamples
    seeds it per sample."""

    def __init__(self, p: float = 0.5, radius: Tuple[float, float] = (0.1, 2.0)):
        self.p = float(p)
        self.radius = (float(radius[0]), float(radius[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        low, high = self.radius
        r = low + torch.rand(()).item() * (high - low)
        return img.filter(ImageFilter.GaussianBlur(radius=r))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius={self.radius})"


def pretraining_transform(img_size: int, crop_scale: Tuple[float, float] = (0.3, 1.0), hflip: bool = True,
                          grayscale_p: float = 0.2, blur_p: float = 0.5, blur_radius: Tuple[float, float] = (0.1, 2.0),
                          color_jitter: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> transforms.Compose:
    """The official StoP augmentations (I-JEPA `make_transforms`, colour jitter off), in the official order:
    RandomResizedCrop (torchvision's default bilinear interpolation, as the official), horizontal flip, colour distortion
    (jitter of strength s applied with p 0.8, then RandomGrayscale), Gaussian blur, ToTensor, Normalize.
    A probability of 0 or `hflip=False` leaves the step out."""
    steps: List[Callable] = [transforms.RandomResizedCrop(img_size, scale=tuple(crop_scale))]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if color_jitter > 0:
        s = float(color_jitter)
        # Official get_color_distortion(s): ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8; strength 0 is a no-op.
        steps.append(transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
    if grayscale_p > 0:
        steps.append(transforms.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        steps.append(RandomGaussianBlur(p=blur_p, radius=blur_radius))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def transform_from_config(data_cfg: Any, img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> transforms.Compose:
    """pretraining_transform with the augmentation fields of the data config section."""
    return pretraining_transform(img_size, crop_scale=tuple(data_cfg.crop_scale), hflip=bool(data_cfg.hflip),
                                 grayscale_p=float(data_cfg.grayscale_p), blur_p=float(data_cfg.blur_p),
                                 blur_radius=tuple(data_cfg.blur_radius), color_jitter=float(data_cfg.color_jitter),
                                 mean=mean, std=std)


# ----------------------------------------------------------------------------------- seeded samples, loader
@contextmanager
def seeded_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed torch's CPU generator, Python's `random` and NumPy's global RNG with `seed` for the block. `restore`: put
    back the states they had after it (in the main process, whose streams, e.g. the predictor noise, must not move;
    a DataLoader worker skips it: NumPy's get/set_state costs about 0.1 ms, and every sample reseeds anyway)."""
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams are not reseeded
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class SeededSamples(Dataset):
    """`dataset` read by distributed.SampleKey: item `key` is `(key, dataset[key.index])`, read and augmented with
    every RNG seeded from (seed, key.epoch, key.index) (`seeded_rngs`). A sample's crop, flip, grayscale and blur
    are therefore the same whichever DataLoader worker or process reads it and whatever it read before: a stopped
    and resumed run sees the augmentations of an uninterrupted one. The draws keep the transforms' own
    distributions; only their seed changes."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any):
        with seeded_rngs(derive_seed(self.seed, "sample", key.epoch, key.index), restore=get_worker_info() is None):
            return key, self.dataset[key.index]


class CollateWithUnreadable:
    """DataLoader collate for SeededSamples items: drop unreadable samples (passing their names on), then build the
    multi-block masks of the batch's iteration, epoch * iterations_per_epoch + position // batch_size, so the masks
    too are a function of where the batch is in the run, not of which worker built it.

    Returns (collated samples, context_masks, target_masks, [(path, error)], iteration); the first three are None
    when no sample of the batch was readable. `collate` puts the readable samples together (default_collate; the
    GPU decode path packs file bytes of different lengths into one tensor, gpu_data.collate_jpeg_bytes)."""

    def __init__(self, mask_collator: Any, batch_size: int, iterations_per_epoch: int,
                 collate: Callable[[List[Any]], Any] = default_collate):
        self.mask_collator, self.collate = mask_collator, collate
        self.batch_size, self.iterations_per_epoch = int(batch_size), int(iterations_per_epoch)

    def __call__(self, items: Sequence[Tuple[Any, Any]]):
        first = items[0][0]
        iteration = first.epoch * self.iterations_per_epoch + first.position // self.batch_size
        good, bad = filter_unreadable([sample for _, sample in items])
        bad = [(str(b.path), str(b.error)) for b in bad]
        if not good:
            return None, None, None, bad, iteration
        context_masks, target_masks = self.mask_collator.sample(len(good), counter=iteration)
        return self.collate(good), context_masks, target_masks, bad, iteration


def pretraining_loader(dataset: Dataset, sampler: Sampler, mask_collator: Any, *, batch_size: int,
                       iterations_per_epoch: int, num_workers: int, seed: int, drop_last: bool = True,
                       pin_memory: bool = False, generator: Optional[torch.Generator] = None,
                       collate: Callable[[List[Any]], Any] = default_collate) -> DataLoader:
    """The pretraining DataLoader: `sampler` yields distributed.SampleKeys (ResumableDistributedSampler), samples
    are seeded per (seed, epoch, index), masks per iteration; persistent workers. `generator` seeds the workers
    (their base seed is drawn from it, never from the global RNG). `collate`: see CollateWithUnreadable."""
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=CollateWithUnreadable(mask_collator, batch_size, iterations_per_epoch, collate),
                      drop_last=drop_last, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=generator)


# ------------------------------------------------------------------------------------------------- datasets
class ImageFolderDataset(Dataset):
    """ImageNet-style class folders (labels = sorted folder names) or a flat folder of images (label -1).

    With class folders, images are found recursively inside each class folder (the zoo's one walk,
    `flexpredict_zoo.features.walk_images`: symbolic links to folders followed once) and files lying directly in
    `root` are ignored; a flat folder gives the images lying directly in it (hidden subfolders are not listed).
    Unreadable images, and what the walk could not read (broken links, link loops, folders that cannot be listed),
    become `UnreadableImage` items with their reason: counted and reported, never left out. A subclass changes only
    how one listed file is loaded (`_load`; gpu_data.JpegBytesDataset gives its bytes).
    """

    def __init__(self, root: os.PathLike, transform: Optional[Callable] = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder; pass the folder "
                                    f"that holds the class subfolders (or the images)")
        self.transform = transform
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_dirs:
            self.classes = [d.name for d in class_dirs]
            found = [(f, label) for label, d in enumerate(class_dirs) for f in walk_images(d)]
        else:
            self.classes = []
            found = [(f, -1) for f in walk_images(self.root, recursive=False)]  # hidden subfolders are not listed
        self.samples = [(str(f.path), label) for f, label in found]
        self.problems: Dict[str, str] = {str(f.path): f.problem for f, _ in found if f.problem is not None}
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        if path in self.problems:
            return UnreadableImage(path, self.problems[path])
        return self._load(path, label)

    def _load(self, path: str, label: int):
        """The item of one listed file: `(image, label)`, the image read and transformed, or UnreadableImage."""
        try:
            img = read_image(path)  # the zoo's one image reader, as extraction and evaluation
        except Exception as e:  # any decode failure: report it, never kill the worker
            return UnreadableImage(path, f"{type(e).__name__}: {e}")
        return (self.transform(img) if self.transform is not None else img), label


@lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 8, 8) float32 grey values in [0, 1] and (N,) int64 labels (read once)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@lru_cache(maxsize=2)
def _digits_upsampled(img_size: int) -> np.ndarray:
    images = torch.from_numpy(_load_digits()[0]).unsqueeze(1)  # (N, 1, 8, 8)
    images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()  # (N, S, S) uint8


@lru_cache(maxsize=1)
def digits_split_indices() -> Tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into load_digits(): stratified, seed DIGITS_SPLIT_SEED, 1,297 / 500."""
    from sklearn.model_selection import train_test_split
    labels = _load_digits()[1]
    train, heldout = train_test_split(np.arange(len(labels)), test_size=DIGITS_HELDOUT, stratify=labels,
                                      random_state=DIGITS_SPLIT_SEED)
    return np.sort(train), np.sort(heldout)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (bundled with scikit-learn, no network), upsampled bilinearly from
    8x8 to img_size x img_size, as 3-channel images. `split` is "train" (1,297) or "heldout" (500).

    Without a transform, items are normalised tensors (3, S, S) computed once; with one, the transform gets a
    PIL RGB image (so the pretraining augmentations apply unchanged). `pixels` holds the upsampled grey values
    in [0, 1], `originals` the 8x8 ones.
    """

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, img_size: int = 32,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if split not in ("train", "heldout"):
            raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
        originals, labels = _load_digits()
        index = digits_split_indices()[0 if split == "train" else 1]
        self.split, self.transform = split, transform
        self.originals = torch.from_numpy(originals[index])  # (N, 8, 8) in [0, 1], as scikit-learn gives them / 16
        self.images = _digits_upsampled(img_size)[index]  # (N, S, S) uint8
        self.labels = torch.from_numpy(labels[index])
        self.classes = [str(i) for i in range(DIGITS_NUM_CLASSES)]
        self.pixels = torch.from_numpy(self.images).float().div(255).unsqueeze(1)  # (N, 1, S, S) in [0, 1]
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.tensors = (self.pixels.expand(-1, 3, -1, -1) - mean_t) / std_t

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        label = int(self.labels[index])
        if self.transform is None:
            return self.tensors[index], label
        return self.transform(Image.fromarray(self.images[index]).convert("RGB")), label


class SyntheticDataset(Dataset):
    """Random normal images, the same for an index on every call (seeded by seed + index); for benchmarks and
    tests. Labels cycle through num_classes."""

    def __init__(self, size: int, img_size: int = 224, num_classes: int = 10, seed: int = 0, channels: int = 3):
        self.size, self.img_size, self.num_classes = int(size), img_size, num_classes
        self.seed, self.channels = seed, channels

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.channels, self.img_size, self.img_size, generator=g), index % self.num_classes


DATASETS = ("folder", "digits", "synthetic")


def _folder_split(root: Path, train: bool) -> Path:
    """An ImageNet root holding train/ and val/ resolves to the split; any other folder is used as is."""
    sub = root / ("train" if train else "val")
    return sub if sub.is_dir() else root


def build_pretraining_dataset(data_cfg: Any, img_size: int, train: bool = True, *,
                              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Dataset:
    """The dataset named by data_cfg.dataset. train=True applies the pretraining augmentations of the config;
    train=False gives the evaluation split and preprocessing (folder: val/, digits: held-out). A folder with
    data.decode=gpu gives its files' bytes (gpu_data.JpegBytesDataset) for training."""
    name = data_cfg.dataset
    if name == "folder":
        if not data_cfg.root:
            raise ValueError("data.dataset=folder needs data.root: an image folder (class subfolders or images), "
                             "or an ImageNet root holding train/ and val/")
        root = _folder_split(Path(data_cfg.root).expanduser(), train)
        if train and getattr(data_cfg, "decode", "cpu") == "gpu":
            from .gpu_data import JpegBytesDataset  # the same files; the device decodes and augments them
            return JpegBytesDataset(root)
        tf = transform_from_config(data_cfg, img_size, mean, std) if train else eval_transform(img_size, mean, std)
        return ImageFolderDataset(root, transform=tf)
    if name == "digits":
        tf = transform_from_config(data_cfg, img_size, mean, std) if train else None
        return DigitsDataset("train" if train else "heldout", transform=tf, img_size=img_size, mean=mean, std=std)
    if name == "synthetic":
        return SyntheticDataset(data_cfg.synthetic_size, img_size=img_size, seed=0 if train else 1)
    raise ValueError(f"unknown data.dataset {name!r}; valid values are {', '.join(DATASETS)}")
