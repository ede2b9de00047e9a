"""GPU JPEG decode and batched augmentation, for when CPU DataLoader workers cannot keep up.

Measured on an H100 machine (16 cores, 500x375 JPEGs): 16 CPU workers doing PIL decode + the official augmentations
deliver about 2,700 images/s, well under the ViT-B/16 step rate, while nvJPEG decodes about 16,000 images/s. So here
the workers only read file bytes (and sample the masks), and the device does the rest in a few batched kernels:

    decode (torchvision.io.decode_jpeg on a list, nvJPEG on CUDA, libjpeg on CPU)
    -> RandomResizedCrop(scale (0.3, 1.0), ratio (3/4, 4/3)) to img_size, bilinear with antialias
    -> horizontal flip p 0.5 -> grayscale p 0.2 -> Gaussian blur p 0.5, sigma ~ U(0.1, 2) -> ImageNet normalisation

which is the order of the official transform (I-JEPA `make_transforms`: crop, flip, colour distortion holding the
grayscale, blur, to-tensor, normalise). Every random draw comes from one CPU `torch.Generator`, so a seed gives the
same augmentations on CPU and on the GPU.

The trainer takes this path with `data.decode=gpu` (engine.Trainer.batches): the workers are those of
data.pretraining_loader (the same sampler, the same unreadable-file reports, masks seeded by the batch's iteration)
and the device-side draws of a batch are seeded from (run.seed, rank, iteration), so a resumed run sees the
augmentations of an uninterrupted one. It needs a CUDA device; tests force it onto the CPU decoder with the
environment variable FLEXPREDICT_TEST_DECODE_ON_CPU=1 (`check_decode_device`), which is for tests only.

Differences from the PIL path (data.py), all below one 8-bit grey level on typical images:
- PIL rounds to uint8 after the resize and after the blur; here everything after decoding stays float32.
- PIL's GaussianBlur(radius) treats radius as the standard deviation but approximates the Gaussian with three
  box blurs (Pillow's "extended box blur"); here the blur is a true sampled Gaussian, truncated at 3 sigma of the
  largest sigma (13 taps for sigma up to 2), with edge pixels replicated as Pillow does (torchvision's tensor
  GaussianBlur reflects instead).
- Grayscale uses torchvision's weights (0.2989, 0.587, 0.114) in float; PIL uses 299/587/114 per mille in integers.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, UnreadableImage, read_image

__all__ = ["JpegBytesDataset", "GpuAugment", "decode_images", "decode_and_augment", "collate_jpeg_bytes", "PackedBytes",
           "check_decode_device", "sample_crop_boxes", "gaussian_blur", "AugmentParams", "IMAGENET_MEAN",
           "IMAGENET_STD", "DECODE_ON_CPU_ENV", "prefetch"]

_JPEG_MAGIC = b"\xff\xd8"
# For tests only: lets data.decode=gpu run its decode-and-augment path on a CPU device (torchvision's CPU decoder),
# so that CPU test suites cover it. Users on a machine without CUDA get a ConfigError instead.
DECODE_ON_CPU_ENV = "FLEXPREDICT_TEST_DECODE_ON_CPU"


def check_decode_device(decode: str, device: torch.device) -> None:
    """Refuse data.decode=gpu on a device that is not CUDA (unless a test set DECODE_ON_CPU_ENV=1), or with a
    torchvision that has no JPEG decoder (torchvision 0.29 deprecated its image decoders for TorchCodec's)."""
    if decode != "gpu":
        return
    from .config import ConfigError
    if torch.device(device).type != "cuda" and os.environ.get(DECODE_ON_CPU_ENV) != "1":
        raise ConfigError(f"data.decode=gpu decodes and augments on a CUDA GPU (nvJPEG), but this run's device is "
                          f"{device}{'' if torch.cuda.is_available() else ' (no CUDA device found)'}; use "
                          f"data.decode=cpu (DataLoader workers decode and augment), or run on a CUDA machine")
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        import torchvision
        raise ConfigError(f"data.decode=gpu decodes with torchvision.io.decode_jpeg (nvJPEG), which torchvision "
                          f"{torchvision.__version__} does not have (its image decoders are deprecated since 0.29); "
                          f"install a torchvision that has it, or use data.decode=cpu") from None


# ------------------------------------------------------------------------------------------------ worker side

class JpegBytesDataset(ImageFolderDataset):
    """The files of data.ImageFolderDataset (the same walk, labels and reported problems), read as bytes: items are
    `(uint8 tensor of the file's bytes, label, path)`; a file that cannot be read, is empty, or that the walk could
    not read gives `UnreadableImage(path, error)` instead (never raises in a worker). Decoding happens later, on
    the device."""

    def __init__(self, root: Union[str, os.PathLike]):
        super().__init__(root)  # no transform: the device decodes and augments the batch

    def _load(self, path: str, label: int):
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            return UnreadableImage(path, f"cannot read file: {error}")
        if len(data) < 4:
            return UnreadableImage(path, f"file has {len(data)} bytes, not an image")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path


class PackedBytes:
    """Byte strings of different lengths in one uint8 tensor: a batch of files crosses from a DataLoader worker to the
    main process as two shared-memory tensors, not one per file. With one per file the main process received 128
    file descriptors per batch and was the bottleneck: a DataLoader over 1,024 JPEGs of 84 KB, batch 128, 2 workers on
    2 CPU cores delivered 2,553-3,282 images/s that way and 11,483-12,729 packed (two alternating passes each)."""

    def __init__(self, strings: Sequence[torch.Tensor]):
        self.buffer = torch.cat([s.reshape(-1) for s in strings]) if strings else torch.empty(0, dtype=torch.uint8)
        self.lengths = torch.tensor([s.numel() for s in strings], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.lengths)

    def unpack(self) -> List[torch.Tensor]:
        """The byte strings, as views of the buffer (no copy)."""
        return list(torch.split(self.buffer, self.lengths.tolist())) if len(self) else []


def unpack_bytes(data: Union[PackedBytes, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    return data.unpack() if isinstance(data, PackedBytes) else list(data)


def collate_jpeg_bytes(samples: Sequence[Tuple[torch.Tensor, int, str]]
                       ) -> Tuple[PackedBytes, torch.Tensor, List[str]]:
    """Readable JpegBytesDataset items -> (their bytes packed, labels, paths). default_collate cannot stack byte
    strings of different lengths; PackedBytes keeps them in one tensor."""
    labels = torch.tensor([int(item[1]) for item in samples], dtype=torch.long)
    return PackedBytes([item[0] for item in samples]), labels, [item[2] for item in samples]


# ------------------------------------------------------------------------------------------------ device side

def decode_images(data: Union[PackedBytes, Sequence[torch.Tensor]], device: Union[str, torch.device],
                  names: Optional[Sequence[str]] = None) -> Tuple[List[torch.Tensor], List[int], List[UnreadableImage]]:
    """Decode file bytes (a list of uint8 tensors or collate_jpeg_bytes' PackedBytes) to RGB uint8 (3, H, W) tensors on
    `device`.

    JPEGs are decoded in one batched call (nvJPEG on CUDA). If that call fails (a corrupt file, or a JPEG nvJPEG
    does not handle, e.g. CMYK), each image is retried alone on the device and then with the CPU decoder, which also
    takes the non-JPEG files (PNG, ...). Returns (images, indices of the decoded inputs, unreadable ones)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    data = unpack_bytes(data)
    names = list(names) if names is not None else [f"batch item {i}" for i in range(len(data))]
    decoded: List[Optional[torch.Tensor]] = [None] * len(data)
    errors: List[Optional[str]] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if bytes(d[:2].tolist()) == _JPEG_MAGIC]
    if jpeg:
        try:
            out = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpeg, out):
                decoded[i] = image
        except RuntimeError:
            for i in jpeg:
                try:
                    decoded[i] = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as error:
                    errors[i] = str(error)
    for i, d in enumerate(data):
        if decoded[i] is None:  # not a JPEG, or nvJPEG refused it: the zoo's one image reader (as the CPU path:
            try:                # 16-bit and float images scaled to 8 bits, every format PIL knows)
                image = read_image(io.BytesIO(d.numpy().tobytes()))
                decoded[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device, non_blocking=True)
            except Exception as error:
                errors[i] = f"cannot decode image: {errors[i] or f'{type(error).__name__}: {error}'}"
    kept = [i for i in range(len(data)) if decoded[i] is not None]
    bad = [UnreadableImage(names[i], errors[i] or "cannot decode image") for i in range(len(data)) if decoded[i] is None]
    return [decoded[i] for i in kept], kept, bad


def sample_crop_boxes(sizes: Sequence[Tuple[int, int]], scale: Tuple[float, float], ratio: Tuple[float, float],
                      generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, height, width) per image, as torchvision's `get_params` samples them:
    up to `tries` draws of an area fraction ~ U(scale) and a log-uniform aspect ratio, the first that fits wins,
    else a central crop clamped to the ratio range. Vectorised over the batch; (B, 4) int64 on CPU."""
    hw = torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    height, width = hw[:, :1], hw[:, 1:]
    n = hw.shape[0]
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), torch.zeros(n, dtype=torch.long))
    h = h.gather(1, first[:, None])[:, 0]
    w = w.gather(1, first[:, None])[:, 0]
    u_top, u_left = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.floor(u_top * (height[:, 0] - h + 1))
    left = torch.floor(u_left * (width[:, 0] - w + 1))
    # Fallback when no draw fits: torchvision's central crop, clamped to the ratio range.
    in_ratio = width[:, 0] / height[:, 0]
    fb_w = torch.where(in_ratio < ratio[0], width[:, 0],
                       torch.where(in_ratio > ratio[1], torch.round(height[:, 0] * ratio[1]), width[:, 0]))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(width[:, 0] / ratio[0]), height[:, 0])
    none = ~fits.any(1)
    h = torch.where(none, fb_h, h)
    w = torch.where(none, fb_w, w)
    top = torch.where(none, torch.div(height[:, 0] - fb_h, 2, rounding_mode="floor"), top)
    left = torch.where(none, torch.div(width[:, 0] - fb_w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], 1).to(torch.long)


def gaussian_kernels(sigmas: torch.Tensor, half_width: int) -> torch.Tensor:
    """(B, 2*half_width+1) normalised 1-D Gaussian kernels, one per sigma (a standard deviation, PIL's `radius`)."""
    taps = torch.arange(-half_width, half_width + 1, dtype=torch.float32, device=sigmas.device)
    kernels = torch.exp(-0.5 * (taps[None, :] / sigmas[:, None].float()) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, half_width: int) -> torch.Tensor:
    """Blur each image of (B, C, H, W) float with its own sigma: separable grouped convolutions, edges replicated."""
    b, c, h, w = images.shape
    kernel = gaussian_kernels(sigmas.to(images.device), half_width).to(images.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, K): one kernel per (image, channel) group
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (half_width, half_width, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, half_width, half_width), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


@dataclass
class AugmentParams:
    """The random draws for one batch (CPU tensors), exposed so tests and the reference can replay them."""
    boxes: torch.Tensor  # (B, 4) top, left, height, width
    flip: torch.Tensor  # (B,) bool
    grayscale: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) float, meaningful where blur


class GpuAugment:
    """The official pretraining augmentations (those of data.pretraining_transform), batched on the device."""

    def __init__(self, img_size: int = 224, crop_scale: Tuple[float, float] = (0.3, 1.0),
                 crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, grayscale_p: float = 0.2,
                 blur_p: float = 0.5, blur_radius: Tuple[float, float] = (0.1, 2.0),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 color_jitter: float = 0.0, seed: int = 0):
        if color_jitter:
            raise ValueError("GpuAugment has no colour jitter (the official recipes use strength 0); "
                             "set data.color_jitter=0 or use the CPU data path")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale {crop_scale} must satisfy 0 < low <= high <= 1")
        self.img_size = int(img_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = bool(hflip)
        self.grayscale_p = float(grayscale_p)
        self.blur_p = float(blur_p)
        self.blur_radius = (float(blur_radius[0]), float(blur_radius[1]))
        self.blur_half_width = max(1, math.ceil(3 * self.blur_radius[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_data_config(cls, data_cfg: Any, img_size: int, seed: int = 0) -> "GpuAugment":
        """From T2's DataConfig (fields crop_scale, hflip, grayscale_p, blur_p, blur_radius, color_jitter)."""
        return cls(img_size=img_size, crop_scale=tuple(data_cfg.crop_scale), hflip=data_cfg.hflip,
                   grayscale_p=data_cfg.grayscale_p, blur_p=data_cfg.blur_p, blur_radius=tuple(data_cfg.blur_radius),
                   color_jitter=getattr(data_cfg, "color_jitter", 0.0), seed=seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample_params(self, sizes: Sequence[Tuple[int, int]], generator: Optional[torch.Generator] = None
                      ) -> AugmentParams:
        """The draws for images of `sizes` (height, width), from `generator` (default: this augment's own)."""
        g = generator if generator is not None else self.generator
        n = len(sizes)
        boxes = sample_crop_boxes(sizes, self.crop_scale, self.crop_ratio, g)
        flip = (torch.rand(n, generator=g) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        grayscale = torch.rand(n, generator=g) < self.grayscale_p
        blur = torch.rand(n, generator=g) < self.blur_p
        lo, hi = self.blur_radius
        sigma = lo + (hi - lo) * torch.rand(n, generator=g)
        return AugmentParams(boxes, flip, grayscale, blur, sigma)

    def __call__(self, images: Sequence[torch.Tensor], params: Optional[AugmentParams] = None,
                 seed: Optional[int] = None) -> torch.Tensor:
        """uint8 (3, H, W) images of any sizes, on one device -> normalised float32 (B, 3, S, S) on that device.
        The draws: `params` if given, else from a generator seeded with `seed`, else from this augment's own."""
        if not images:
            raise ValueError("GpuAugment got an empty batch")
        if params is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            params = self.sample_params([tuple(im.shape[-2:]) for im in images], generator)
        device = images[0].device
        size = (self.img_size, self.img_size)
        crops = []
        for image, (top, left, h, w) in zip(images, params.boxes.tolist()):
            # Per image: crops differ in size, and antialiased bilinear resize is what RandomResizedCrop does
            # (torchvision tensors with antialias=True; PIL's bilinear filter also antialiases when shrinking).
            crop = image[None, :, top:top + h, left:left + w].float()
            crops.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True))
        x = torch.cat(crops).clamp_(0, 255)
        flip = params.flip.to(device, non_blocking=True)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        gray_weights = torch.tensor([0.2989, 0.587, 0.114], device=device)
        gray = (x * gray_weights[None, :, None, None]).sum(1, keepdim=True).expand_as(x)
        x = torch.where(params.grayscale.to(device, non_blocking=True)[:, None, None, None], gray, x)
        blurred = params.blur.nonzero()[:, 0]
        if blurred.numel():
            index = blurred.to(device, non_blocking=True)
            x = x.index_copy(0, index, gaussian_blur(x.index_select(0, index), params.sigma[blurred],
                                                     self.blur_half_width))
        mean = torch.tensor(self.mean, device=device)[None, :, None, None] * 255
        std = torch.tensor(self.std, device=device)[None, :, None, None] * 255
        return (x - mean) / std


def decode_and_augment(data: Union[PackedBytes, Sequence[torch.Tensor]], paths: Sequence[str],
                       context_masks: Sequence[torch.Tensor],
                       target_masks: Sequence[torch.Tensor], augment: GpuAugment, device: Union[str, torch.device],
                       seed: Optional[int] = None):
    """The device side of one batch: decode the file bytes on `device`, drop the mask rows of the files that did
    not decode, augment (draws seeded with `seed`, see GpuAugment.__call__).

    Returns (images (B, 3, S, S) float32 or None when nothing decoded, context_masks, target_masks (on `device`),
    indices of the decoded inputs, UnreadableImage of each file that did not decode)."""
    device = torch.device(device)
    images, kept, undecodable = decode_images(data, device, names=paths)
    if not images:
        return None, [], [], kept, undecodable
    if len(kept) < len(data):  # masks were sampled for len(data) images: keep the decoded rows
        rows = torch.tensor(kept, dtype=torch.long)
        context_masks = [m[rows] for m in context_masks]
        target_masks = [m[rows] for m in target_masks]
    to = dict(device=device, non_blocking=device.type == "cuda")
    return (augment(images, seed=seed), [m.to(**to) for m in context_masks], [m.to(**to) for m in target_masks],
            kept, undecodable)


# ------------------------------------------------------------------------------------------------ overlap

_END = object()


def prefetch(items: Iterator[Any], prepare: Callable[[Any], Any], device: Union[str, torch.device],
             depth: int = 1) -> Iterator[Any]:
    """`prepare(item)` for each item, in order, computed up to `depth` items ahead by a background thread (on a
    CUDA stream of its own on a GPU, so decoding overlaps the training step; the consumer's stream waits for each
    batch's event before using it). depth 0: prepared in the caller, one after the other. Errors of the thread are
    raised in the caller; closing the generator (a loop that breaks) stops the thread."""
    device = torch.device(device)
    if depth <= 0:
        for item in items:
            yield prepare(item)
        return
    if device.type == "cuda" and device.index is None:  # "cuda": the caller's current device, not the thread's
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> None:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            if stream is not None:
                torch.cuda.set_device(device)  # a new thread starts on device 0: each rank has its own device
            for item in items:
                if stop.is_set():
                    return
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    prepared = prepare(item)
                    event = stream.record_event() if stream is not None else None
                put((prepared, event, None))
            put((_END, None, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, None, error))

    thread = threading.Thread(target=work, name="flexpredict-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            prepared, event, error = ready.get()
            if error is not None:
                raise error
            if prepared is _END:
                return
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for tensor in _tensors(prepared):  # made on the side stream, used on this one: keep them alive
                    tensor.record_stream(current)
            yield prepared
    finally:
        stop.set()
        thread.join()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
