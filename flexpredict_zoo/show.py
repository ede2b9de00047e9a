"""Pictures of what the patch features hold: `flexpredict-zoo show` and `show()` behind it.

    from flexpredict_zoo.show import show
    paths = show("flexpredict_vit_b16", ["photos/"], "show_out", patch=(7, 7), background_threshold=0.5)
    paths["contact_sheet"], paths["html"], paths["maps"]

For the given images (files or folders, read as `extract` reads them) it writes, into one folder:
- `contact_sheet.png`: one row per image: the input as the model saw it (evaluation transform), the PCA of the
  patch features (the first three principal components as RGB, fitted jointly over all the images, so a colour
  means the same thing in every image), and the cosine similarity of every patch to one chosen patch;
- `show.html`: a self-contained page (no server, no network) with the same three pictures per image; clicking a
  patch of any image recomputes the similarity maps of all images in the page's JavaScript. The page holds the
  L2-normalised patch features as float16 (full dimension), so its maps equal the Python ones within 2**-10;
- `maps.npz`: the arrays behind the pictures (names, pca_rgb, similarity, foreground, grid, patch).

Any timm ViT-like model works: class and register tokens are dropped (`encode_batch`), and a model built with
`dynamic_img_size=True` takes any `img_size`. Drawing needs matplotlib (`pip install "flexpredict-zoo[viz]"`).
The PCA and the grid drawer here also draw `flexpredict-train demo`'s pictures.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .atomic_write import check_writable, write_file_atomically, write_folder_atomically
from .errors import CommandUnavailableError
from .features import (ImageFile, PathLike, _load_model, add_model_arguments, encode_batch, eval_transform,
                       extract_features, find_images, model_arguments, model_data_config, model_eval_transform,
                       read_image)
from .locks import claim_output

__all__ = ["show", "PatchPCA", "patch_grid", "patch_features", "pca_rgb", "patch_pca_rgb", "similarity_maps",
           "Tile", "draw_grid", "grid_size_px", "require_matplotlib", "OUTPUT_NAMES", "HTML_TOLERANCE",
           "add_show_arguments", "run_show"]

OUTPUT_NAMES = {"contact_sheet": "contact_sheet.png", "html": "show.html", "maps": "maps.npz"}
MATPLOTLIB_MISSING = 'drawing needs matplotlib, which is not installed: pip install "flexpredict-zoo[viz]"'
# The page's features are float16 unit vectors: each rounding error is at most 2**-11 of its value, so a dot
# product differs from the float32 one by at most 2 * 2**-11 (Cauchy-Schwarz), plus float32's own rounding.
HTML_TOLERANCE = 2.0 ** -10 + 1e-6
SIMILARITY_CMAP = "viridis"
MARK_COLOUR = "red"
# Layout of draw_grid, in pixels (the figure is drawn at DPI, so its size in pixels is exact).
DPI = 100
GAP_PX = 8
LINE_PX = 15
LABEL_WIDTH_PX = 160


def require_matplotlib() -> None:
    """Raise CommandUnavailableError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandUnavailableError(MATPLOTLIB_MISSING) from None


# ------------------------------------------------------------------------------------------------ features
def patch_grid(model: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """(rows, columns) of patches for an input of `image_size` (H, W): the model's own grid, or for a model built
    with dynamic_img_size the grid of that size."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed: patch pictures need a ViT-like timm model")
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(image_size)))  # type: ignore[return-value]
    return tuple(int(s) for s in patch_embed.grid_size)  # type: ignore[return-value]


def _check_grid(tokens: torch.Tensor, grid: Tuple[int, int]) -> None:
    if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"patch features of shape {tuple(tokens.shape)} do not fit a {grid[0]}x{grid[1]} patch grid "
                         f"(expected (images, {grid[0] * grid[1]}, dim))")


@torch.inference_mode()
def patch_features(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """((B, rows*cols, D) final-normed patch tokens, class and register tokens dropped, (rows, cols)) of a batch
    of preprocessed images, through the extractor's forward (`encode_batch`)."""
    tokens = encode_batch(model, images, patch_tokens=True)["tokens"]
    grid = patch_grid(model, tuple(images.shape[-2:]))
    _check_grid(tokens, grid)
    return tokens, grid


@dataclass
class PatchPCA:
    """The PCA picture of patch features. rgb (B, rows, cols, 3) in [0, 1]; projections (B, rows, cols, 3) the
    raw coordinates on the components (before scaling; over the foreground fit when a threshold is given);
    components (3, D); first (B, rows, cols) the first component of the fit over all patches, scaled to [0, 1]
    (what `background_threshold` compares against); foreground (B, rows, cols) bool, or None without a threshold."""
    rgb: torch.Tensor
    projections: torch.Tensor
    components: torch.Tensor
    first: torch.Tensor
    foreground: Optional[torch.Tensor] = None


def _principal_axes(flat: torch.Tensor, count: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (count, D)) of the rows of `flat`, each component signed so that its entry of
    largest magnitude is positive (a fixed sign, as scikit-learn's svd_flip); missing ones are zero."""
    flat = flat.double()
    mean = flat.mean(0)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    components = torch.zeros(count, flat.shape[1], dtype=torch.float64)
    take = min(count, vh.shape[0])
    components[:take] = vh[:take]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components *= torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean, components


def _scale(values: torch.Tensor) -> torch.Tensor:
    """Each column to [0, 1] between its 1st and 99th percentiles (clipped), so a few outlier patches do not
    wash the picture out."""
    low, high = torch.quantile(values, 0.01, dim=0), torch.quantile(values, 0.99, dim=0)
    return ((values - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)


def _border(grid: Tuple[int, int], images: int) -> torch.Tensor:
    rows, cols = grid
    border = torch.ones(rows, cols, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return border.reshape(1, -1).expand(images, -1).reshape(-1)


def pca_rgb(tokens: torch.Tensor, grid: Tuple[int, int], background_threshold: Optional[float] = None) -> PatchPCA:
    """The first three principal components of the patch features `tokens` (B, rows*cols, D), fitted jointly over
    all B images, as RGB (each component scaled to [0, 1] between its 1st and 99th percentiles).

    Sign convention: each component is signed so that its loading of largest magnitude is positive; then the first
    component is flipped, if needed, so that the patches on the border of the grid score lower on average than the
    inner ones (the background is usually at the border; grids of at least 3x3). With `background_threshold` t
    (in [0, 1]), patches whose scaled first component is below t are background: they are drawn black, and the three
    RGB components are fitted again over the foreground patches alone (the DINOv2 picture)."""
    _check_grid(tokens, grid)
    images, count, dim = tokens.shape
    flat = tokens.reshape(images * count, dim).double()
    mean, components = _principal_axes(flat)
    projections = (flat - mean) @ components.T
    if grid[0] >= 3 and grid[1] >= 3:
        border = _border(grid, images)
        if projections[border, 0].mean() > projections[~border, 0].mean():
            components[0], projections[:, 0] = -components[0], -projections[:, 0]
    first = _scale(projections[:, :1])[:, 0]
    foreground = None
    rgb = _scale(projections)
    if background_threshold is not None:
        if not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1] (it compares the first component scaled to "
                             f"[0, 1]), got {background_threshold}")
        foreground = first >= background_threshold
        if int(foreground.sum()) < 2:
            raise ValueError(f"background_threshold {background_threshold} leaves {int(foreground.sum())} foreground "
                             f"patches of {len(first)}; lower it")
        mean, components = _principal_axes(flat[foreground])
        projections = (flat - mean) @ components.T
        rgb = torch.zeros(len(flat), 3, dtype=torch.float64)
        rgb[foreground] = _scale(projections[foreground])
    shape = (images, *grid)
    return PatchPCA(rgb=rgb.reshape(*shape, 3).float(), projections=projections.reshape(*shape, 3).float(),
                    components=components.float(), first=first.reshape(shape).float(),
                    foreground=None if foreground is None else foreground.reshape(shape))


def patch_pca_rgb(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols, 3) in [0, 1]: `pca_rgb` of the patch features of a batch of preprocessed images."""
    return pca_rgb(*patch_features(model, images)).rgb


def similarity_maps(tokens: torch.Tensor, grid: Tuple[int, int], image: int, row: int, col: int) -> torch.Tensor:
    """(B, rows, cols): the cosine similarity of every patch of every image to patch (row, col) of image `image`."""
    _check_grid(tokens, grid)
    rows, cols = grid
    if not 0 <= image < tokens.shape[0]:
        raise ValueError(f"image index {image} is out of range: there are {tokens.shape[0]} images (0.."
                         f"{tokens.shape[0] - 1})")
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"patch ({row}, {col}) is outside the {rows}x{cols} patch grid: rows 0..{rows - 1}, "
                         f"columns 0..{cols - 1}")
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    query = unit[image, row * cols + col]
    return (unit @ query).reshape(tokens.shape[0], rows, cols)


# ------------------------------------------------------------------------------------------------ drawing
@dataclass
class Tile:
    """One picture of a grid: `image` (H, W, 3) in [0, 1], or (H, W) values drawn with `cmap` between vmin and
    vmax. With `grid` (rows, cols), `mark` (row, col) outlines that patch; `frame` colours the tile's border."""
    image: Any
    cmap: Optional[str] = None
    vmin: float = 0.0
    vmax: float = 1.0
    grid: Optional[Tuple[int, int]] = None
    mark: Optional[Tuple[int, int]] = None
    frame: Optional[str] = None
    smooth: bool = False  # photos are smoothed when shrunk; patch maps keep their blocks


def _wrap(text: Optional[str], width_px: int) -> List[str]:
    if not text:
        return []
    chars = max(10, int(width_px / 6.2))
    return [line for part in text.split("\n") for line in (textwrap.wrap(part, chars) or [""])]


def _short(text: str, chars: int) -> str:
    """`text`, shortened in the middle to `chars` characters (an image name's start and end both matter)."""
    if len(text) <= chars:
        return text
    keep = chars - 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def grid_size_px(rows: int, cols: int, tile_px: Tuple[int, int], title_lines: int = 0,
                 label_px: int = 0, column_title_lines: int = 0) -> Tuple[int, int]:
    """(width, height) in pixels of a `draw_grid` picture:
    width = label_px (the row labels' column; 0 without) + cols * tile_w + (cols + 1) * GAP_PX,
    height = (title_lines + column_title_lines) * LINE_PX + [GAP_PX if any title line] + rows * tile_h
    + (rows + 1) * GAP_PX."""
    tile_h, tile_w = tile_px
    width = label_px + cols * tile_w + (cols + 1) * GAP_PX
    lines = title_lines + column_title_lines
    height = lines * LINE_PX + (GAP_PX if lines else 0) + rows * tile_h + (rows + 1) * GAP_PX
    return width, height


def _column_title_lines(column_titles: Sequence[str], tile_w: int) -> List[List[str]]:
    """Each column title wrapped to its tile and the empty-titled tiles after it (a title runs on over them)."""
    lines = []
    for c, text in enumerate(column_titles):
        span = 1
        while c + span < len(column_titles) and not column_titles[c + span]:
            span += 1
        lines.append(_wrap(text, span * tile_w + (span - 1) * GAP_PX))
    return lines


def _render_grid(tiles: Sequence[Sequence[Optional[Tile]]], tile_px: Tuple[int, int], title: Optional[str],
                 row_labels: Optional[Sequence[str]], column_titles: Optional[Sequence[str]],
                 label_px: int) -> np.ndarray:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, cols = len(tiles), max(len(r) for r in tiles)
    tile_h, tile_w = tile_px
    label_px = label_px if row_labels else 0
    width_guess = grid_size_px(rows, cols, tile_px, label_px=label_px)[0]
    title_lines = _wrap(title, width_guess - 2 * GAP_PX)
    column_texts = _column_title_lines(column_titles or [], tile_w)
    column_lines = max((len(lines) for lines in column_texts), default=0)
    width, height = grid_size_px(rows, cols, tile_px, len(title_lines), label_px, column_lines)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)

    def at(x: float, y: float) -> Tuple[float, float]:  # pixels from the top left -> figure coordinates
        return x / width, 1 - y / height

    for i, line in enumerate(title_lines):
        figure.text(*at(GAP_PX, (i + 0.8) * LINE_PX), line, fontsize=9, weight="bold" if i == 0 else "normal",
                    va="baseline")
    left = label_px
    top = (len(title_lines) + column_lines) * LINE_PX + (GAP_PX if title_lines or column_lines else 0)
    for c, lines in enumerate(column_texts):
        for i, line in enumerate(lines):
            y = (len(title_lines) + i + 0.8) * LINE_PX
            figure.text(*at(left + GAP_PX + c * (tile_w + GAP_PX), y), line, fontsize=8, va="baseline")
    for r, tile_row in enumerate(tiles):
        y0 = top + GAP_PX + r * (tile_h + GAP_PX)
        if row_labels and r < len(row_labels):
            figure.text(*at(GAP_PX, y0 + tile_h / 2), _short(row_labels[r], int((label_px - GAP_PX) / 6.2)),
                        fontsize=8, va="center")
        for c, tile in enumerate(tile_row):
            if tile is None:
                continue
            x0 = left + GAP_PX + c * (tile_w + GAP_PX)
            fx, fy = at(x0, y0 + tile_h)
            axes = figure.add_axes((fx, fy, tile_w / width, tile_h / height))
            image = np.asarray(tile.image)
            grid = tile.grid or image.shape[:2]
            axes.imshow(image, cmap=tile.cmap, vmin=tile.vmin, vmax=tile.vmax, extent=(0, grid[1], grid[0], 0),
                        interpolation="antialiased" if tile.smooth else "nearest", aspect="auto")
            axes.set_xticks([]), axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(tile.frame is not None)
                if tile.frame is not None:
                    spine.set_edgecolor(tile.frame), spine.set_linewidth(3)
            if tile.mark is not None:
                axes.add_patch(Rectangle((tile.mark[1], tile.mark[0]), 1, 1, fill=False, edgecolor=MARK_COLOUR,
                                         linewidth=2))
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def draw_grid(tiles: Sequence[Sequence[Optional[Tile]]], path: Optional[PathLike] = None, *,
              tile_px: Tuple[int, int] = (128, 128), title: Optional[str] = None,
              row_labels: Optional[Sequence[str]] = None, column_titles: Optional[Sequence[str]] = None,
              label_px: int = LABEL_WIDTH_PX) -> Union[bytes, Path]:
    """A grid of pictures (rows of Tiles; None leaves a cell empty) as an RGB PNG, drawn with matplotlib at an
    exact pixel size (`grid_size_px`; a column title longer than its tile runs on over the next, empty, titles).
    `label_px`: width of the row labels' column (labels are shortened in the middle to fit). With `path` the PNG
    is written there atomically and `path` returned; without, its bytes are returned."""
    png = _png_bytes(_render_grid(tiles, tile_px, title, row_labels, column_titles, label_px))
    if path is None:
        return png
    return write_file_atomically(Path(path), lambda temp: temp.write_bytes(png))


def _png_bytes(pixels: np.ndarray) -> bytes:
    """The PNG of (H, W, 3) uint8 RGB pixels."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ show
class _Preprocessed(Dataset):
    """(image tensor, -1) items for extract_features: the images are read and transformed once, here, so the
    pictures show exactly the pixels the model saw."""

    def __init__(self, images: Sequence[torch.Tensor]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], -1


def _load_for_show(model: Union[str, nn.Module], img_size: Optional[int], pretrained: bool,
                   model_kwargs: Optional[Mapping[str, Any]], weights: Optional[PathLike],
                   encoder: Optional[str]) -> Tuple[nn.Module, str, Callable, Tuple[int, int]]:
    """(model, its name, eval transform, input (H, W)). The extractor's loader; `img_size` resizes a model loaded
    here (timm's set_input_size) or feeds a dynamic_img_size model at that size."""
    loaded = _load_model(model, None, True, pretrained, model_kwargs, weights, encoder)
    net = loaded.model
    size = (img_size, img_size) if img_size is not None else None
    if size is not None and not getattr(net, "dynamic_img_size", False):
        if size != tuple(net.patch_embed.img_size):
            if isinstance(model, nn.Module):
                raise ValueError(f"the model takes {tuple(net.patch_embed.img_size)} inputs, not {size}: build it "
                                 f"with dynamic_img_size=True or img_size={img_size}")
            net.set_input_size(img_size=size)
    if size is not None and getattr(net, "dynamic_img_size", False):
        config = model_data_config(net)
        transform = eval_transform(size, config["mean"], config["std"], config["interpolation"],
                                   config["crop_pct"], config.get("crop_mode") or "center")
        return net, loaded.name, transform, size
    transform, input_size = model_eval_transform(net)
    return net, loaded.name, transform, tuple(input_size[1:])  # type: ignore[return-value]


def _displayable(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, H, W, 3) uint8: the preprocessed images with the normalisation undone."""
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _png_base64(pixels: np.ndarray) -> str:
    return base64.b64encode(_png_bytes(pixels)).decode("ascii")


def _colormap_lut(name: str = SIMILARITY_CMAP) -> List[List[int]]:
    require_matplotlib()
    import matplotlib
    colours = matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return (colours * 255).round().astype(int).tolist()


def _contact_sheet(model_name: str, names: Sequence[str], pixels: np.ndarray, pca: PatchPCA, maps: torch.Tensor,
                   grid: Tuple[int, int], patch: Tuple[int, int, int], tile: int) -> bytes:
    source, row, col = patch
    vmin = float(maps.min())
    tiles = []
    for i in range(len(names)):
        mark = (row, col) if i == source else None
        # photos are smoothed when shrunk; small inputs (digits) are enlarged with their pixels kept
        tiles.append([Tile(pixels[i] / 255.0, grid=grid, mark=mark, smooth=pixels.shape[2] > tile),
                      Tile(pca.rgb[i].numpy(), grid=grid),
                      Tile(maps[i].numpy(), cmap=SIMILARITY_CMAP, vmin=vmin, vmax=1.0, grid=grid, mark=mark)])
    height, width = pixels.shape[1:3]
    background = (" Background (first component below the threshold) in black." if pca.foreground is not None else "")
    title = (f"{model_name}: {len(names)} images at {height}x{width}, {grid[0]}x{grid[1]} patches\n"
             f"PCA: first 3 principal components of the patch features as RGB, fitted jointly over all images."
             f"{background}\n"
             f"Similarity: cosine to patch (row {row}, col {col}) of {_short(names[source], 40)} (red box); "
             f"{SIMILARITY_CMAP} from {vmin:.2f} to 1.")
    return draw_grid(tiles, tile_px=(round(tile * height / width), tile), title=title, row_labels=names,
                     column_titles=["input", "PCA of patch features", "similarity to the red patch"])


def _float16_base64(unit: torch.Tensor) -> str:
    return base64.b64encode(unit.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()).decode("ascii")


def _render(model: Union[str, nn.Module], files: Sequence[ImageFile], patch: Optional[Tuple[int, int]],
            patch_image: int, background_threshold: Optional[float], img_size: Optional[int], pretrained: bool,
            model_kwargs: Optional[Mapping[str, Any]], weights: Optional[PathLike], encoder: Optional[str],
            device: Union[None, str, torch.device], batch_size: int, tile: int) -> Dict[str, bytes]:
    """The contents of OUTPUT_NAMES for `show`."""
    net, model_name, transform, size = _load_for_show(model, img_size, pretrained, model_kwargs, weights, encoder)
    if not isinstance(model, nn.Module) and not pretrained:
        model_name += " (random weights, seed 0)"  # the pictures must not pass for the released model's
    grid = patch_grid(net, size)
    row, col = patch if patch is not None else (grid[0] // 2, grid[1] // 2)
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ValueError(f"patch ({row}, {col}) is outside the {grid[0]}x{grid[1]} patch grid of {model_name} at "
                         f"{size[0]}x{size[1]}: rows 0..{grid[0] - 1}, columns 0..{grid[1] - 1}")
    images = []
    for file in files:
        try:
            images.append(transform(read_image(file.path)))
        except Exception as error:  # a picture of some of the images would hide which one was not read
            raise ValueError(f"cannot read image {str(file.path)!r} ({type(error).__name__}: {error}); remove it "
                             f"from the inputs or replace it") from None
    names = [file.name for file in files]
    result = extract_features(net, _Preprocessed(images), patch_tokens=True, batch_size=batch_size, device=device)
    tokens = result.patch_tokens
    assert tokens is not None
    _check_grid(tokens, grid)
    pca = pca_rgb(tokens, grid, background_threshold)
    maps = similarity_maps(tokens, grid, patch_image, row, col)
    config = model_data_config(net)
    pixels = _displayable(torch.stack(images), config["mean"], config["std"])
    chosen = (patch_image, row, col)
    arrays = io.BytesIO()
    np.savez_compressed(arrays, names=np.array(names), pca_rgb=pca.rgb.numpy(), similarity=maps.numpy(),
                        foreground=(pca.foreground.numpy() if pca.foreground is not None
                                    else np.ones(maps.shape, dtype=bool)),
                        grid=np.array(grid), patch=np.array(chosen), image_size=np.array(size))
    return {OUTPUT_NAMES["contact_sheet"]: _contact_sheet(model_name, names, pixels, pca, maps, grid, chosen, tile),
            OUTPUT_NAMES["html"]: _html_page(model_name, names, pixels, pca, tokens, grid, chosen).encode("utf-8"),
            OUTPUT_NAMES["maps"]: arrays.getvalue()}


def show(model: Union[str, nn.Module], inputs: Union[PathLike, Sequence[PathLike]], out_dir: PathLike, *,
         patch: Optional[Tuple[int, int]] = None, patch_image: int = 0, background_threshold: Optional[float] = None,
         img_size: Optional[int] = None, pretrained: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
         weights: Optional[PathLike] = None, encoder: Optional[str] = None,
         device: Union[None, str, torch.device] = None, batch_size: int = 32, tile: int = 192,
         overwrite: bool = False) -> Dict[str, Path]:
    """Write the contact sheet, the HTML page and the arrays (OUTPUT_NAMES) for `inputs` into `out_dir`.

    `model`: anything `extract` takes (name, run folder, checkpoint, exported folder, `hf-hub:`, `local-dir:`,
    with `pretrained`, `weights`, `encoder`, `model_kwargs`; random weights are seeded 0) or a timm ViT-like
    nn.Module. `inputs`: image files and folders (`find_images`). `patch` (row, col) of image `patch_image`
    (an index into the inputs in order) is the one the similarity maps compare with; default the centre patch.
    `background_threshold`: see `pca_rgb`. `img_size`: the input size (a model loaded here is resized with
    set_input_size; a dynamic_img_size model just takes it). Files already in `out_dir` are refused unless
    `overwrite`; all outputs are written atomically. Returns {"contact_sheet", "html", "maps"} -> path.
    """
    require_matplotlib()  # before anything slow
    out_dir = Path(out_dir)
    files = find_images(inputs)
    for file in files:
        if file.problem is not None:
            raise ValueError(f"cannot read image {str(file.path)!r} ({file.problem}); remove it from the inputs or "
                             f"fix it")
    if not 0 <= patch_image < len(files):
        raise ValueError(f"patch image index {patch_image} is out of range: {len(files)} images were given "
                         f"(0..{len(files) - 1}, in the order listed)")
    check_writable(out_dir.parent)
    with claim_output(out_dir, "show", overwrite, names=OUTPUT_NAMES.values()):  # one process per folder
        contents = _render(model, files, patch, patch_image, background_threshold, img_size, pretrained,
                           model_kwargs, weights, encoder, device, batch_size, tile)
        write_folder_atomically(out_dir, {name: (lambda path, data=data: path.write_bytes(data))
                                          for name, data in contents.items()})
    return {key: out_dir / name for key, name in OUTPUT_NAMES.items()}


# ------------------------------------------------------------------------------------------------ the page
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px 0; } p { margin: 4px 0; font-size: 13px; }
.card { display: inline-block; vertical-align: top; margin: 8px 12px 8px 0; }
.name { font-size: 12px; margin-bottom: 2px; max-width: 700px; overflow-wrap: anywhere; }
.pane { position: relative; display: inline-block; margin-right: 6px; cursor: crosshair; }
.pane img, .pane canvas { width: __PX__px; height: __PY__px; display: block; }
.pixelated { image-rendering: pixelated; }
.mark { position: absolute; border: 2px solid red; box-sizing: border-box; pointer-events: none; display: none; }
.caption { font-size: 11px; color: #555; }
</style></head>
<body>
<h1>__TITLE__</h1>
<p>__SUBTITLE__</p>
<p id="status"></p>
<div id="cards"></div>
<script id="show-data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("show-data").textContent);
const [rows, cols] = data.grid, count = rows * cols, dim = data.dim;

function halfToFloat(h) {  // IEEE float16 -> number (exact)
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
}
const raw = Uint8Array.from(atob(data.features), c => c.charCodeAt(0));
const halves = new Uint16Array(raw.buffer);
const features = new Float32Array(halves.length);  // float16 values are exact in float32
for (let i = 0; i < halves.length; i++) features[i] = halfToFloat(halves[i]);

const state = { image: data.patch[0], row: data.patch[1], col: data.patch[2], maps: [], vmin: 0, vmax: 1, clicks: 0 };
window.showState = state;

function computeMaps(image, row, col) {
  const q = (image * count + row * cols + col) * dim;
  const maps = [];
  for (let n = 0; n < data.names.length; n++) {
    const map = new Array(count);
    for (let p = 0; p < count; p++) {
      const o = (n * count + p) * dim;
      let s = 0;
      for (let d = 0; d < dim; d++) s += features[o + d] * features[q + d];
      map[p] = s;
    }
    maps.push(map);
  }
  return maps;
}

const cards = document.getElementById("cards"), panes = [];
function addPane(parent, element, caption) {
  const pane = document.createElement("div");
  pane.className = "pane";
  pane.appendChild(element);
  const mark = document.createElement("div");
  mark.className = "mark";
  mark.style.width = (100 / cols) + "%"; mark.style.height = (100 / rows) + "%";
  pane.appendChild(mark);
  const text = document.createElement("div");
  text.className = "caption"; text.textContent = caption;
  const holder = document.createElement("div");
  holder.style.display = "inline-block";
  holder.appendChild(pane); holder.appendChild(text);
  parent.appendChild(holder);
  return { pane, mark };
}
data.names.forEach((name, n) => {
  const card = document.createElement("div");
  card.className = "card";
  const title = document.createElement("div");
  title.className = "name"; title.textContent = n + ": " + name;
  card.appendChild(title);
  const input = new Image(); input.src = "data:image/png;base64," + data.inputs[n]; input.alt = name;
  const pca = new Image(); pca.src = "data:image/png;base64," + data.pca[n]; pca.className = "pixelated";
  const canvas = document.createElement("canvas");
  canvas.width = cols; canvas.height = rows; canvas.className = "pixelated"; canvas.id = "map-" + n;
  const panesOfCard = [addPane(card, input, "input"), addPane(card, pca, "PCA"),
                       addPane(card, canvas, "cosine similarity")];
  panesOfCard.forEach(({ pane }) => pane.addEventListener("click", event => {
    const box = pane.getBoundingClientRect();
    const col = Math.min(cols - 1, Math.max(0, Math.floor((event.clientX - box.left) / box.width * cols)));
    const row = Math.min(rows - 1, Math.max(0, Math.floor((event.clientY - box.top) / box.height * rows)));
    state.clicks += 1;
    select(n, row, col);
  }));
  panes.push({ canvas, marks: panesOfCard.map(p => p.mark) });
  cards.appendChild(card);
});

function select(image, row, col) {
  const maps = computeMaps(image, row, col);
  let vmin = Infinity;
  maps.forEach(map => map.forEach(v => { vmin = Math.min(vmin, v); }));
  const vmax = 1, lut = data.colormap;
  maps.forEach((map, n) => {
    const context = panes[n].canvas.getContext("2d"), pixels = context.createImageData(cols, rows);
    for (let p = 0; p < count; p++) {
      const t = Math.min(1, Math.max(0, (map[p] - vmin) / Math.max(vmax - vmin, 1e-12)));
      const colour = lut[Math.min(255, Math.floor(t * 256))];
      pixels.data.set([colour[0], colour[1], colour[2], 255], 4 * p);
    }
    context.putImageData(pixels, 0, 0);
    panes[n].marks.forEach(mark => {
      mark.style.display = n === image ? "block" : "none";
      mark.style.left = (100 * col / cols) + "%"; mark.style.top = (100 * row / rows) + "%";
    });
  });
  Object.assign(state, { image, row, col, maps, vmin, vmax });
  document.getElementById("status").textContent = "similarity to patch (row " + row + ", col " + col + ") of " +
    data.names[image] + "; colour scale " + vmin.toFixed(2) + " (dark) to 1 (yellow). Click any patch to choose another.";
}
select(state.image, state.row, state.col);
</script>
</body></html>
"""


def _html_page(model_name: str, names: Sequence[str], pixels: np.ndarray, pca: PatchPCA, tokens: torch.Tensor,
               grid: Tuple[int, int], patch: Tuple[int, int, int], display_px: int = 224) -> str:
    height, width = pixels.shape[1:3]
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    pca_pixels = (pca.rgb.numpy() * 255).round().astype(np.uint8)
    data = {"model": model_name, "names": list(names), "grid": list(grid), "dim": int(tokens.shape[-1]),
            "patch": list(patch), "inputs": [_png_base64(p) for p in pixels],
            "pca": [_png_base64(p) for p in pca_pixels], "features": _float16_base64(unit),
            "colormap": _colormap_lut()}
    background = " (background in black)" if pca.foreground is not None else ""
    subtitle = (f"{len(names)} images at {height}x{width}, {grid[0]}x{grid[1]} patches. PCA: first 3 principal "
                f"components of the patch features as RGB, fitted jointly over all images{background}. "
                f"Similarity: cosine of every patch to the chosen one (red box), computed in this page from the "
                f"L2-normalised patch features stored as float16.")
    # "</" cannot end the JSON script element early: json.dumps leaves no "<" unescaped after this.
    payload = json.dumps(data).replace("<", "\\u003c")
    replacements = {"__TITLE__": html.escape(f"{model_name}: patch features"), "__SUBTITLE__": html.escape(subtitle),
                    "__PX__": str(display_px), "__PY__": str(round(display_px * height / width)),
                    "__DATA__": payload}
    page = _PAGE
    for key, value in replacements.items():
        page = page.replace(key, value)
    return page


# ------------------------------------------------------------------------------------------------ CLI
def _patch_argument(text: str) -> Tuple[int, int]:
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--patch takes ROW,COL (two integers, e.g. 7,7), got {text!r}") from None
    return row, col


def add_show_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `flexpredict-zoo show MODEL PATH... --out DIR` (the model and the images as `extract` takes
    them: features.add_model_arguments)."""
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help=f"folder for {', '.join(OUTPUT_NAMES.values())}")
    parser.add_argument("--patch", type=_patch_argument, default=None, metavar="ROW,COL",
                        help="the patch the similarity maps compare with (default: the centre patch)")
    parser.add_argument("--patch-image", type=int, default=0, metavar="I",
                        help="index of the image holding --patch, in the order the images are listed (default 0)")
    parser.add_argument("--background-threshold", type=float, default=None, metavar="T",
                        help="drop the background: patches whose first principal component (scaled to [0, 1], "
                             "signed so the border of the images scores low) is below T are drawn black, and the "
                             "PCA is fitted again over the rest (try 0.5)")
    parser.add_argument("--img-size", type=int, default=None, metavar="S",
                        help="input size in pixels (default: the model's); the model is resized for it")
    parser.add_argument("--overwrite", action="store_true", help=f"replace {', '.join(OUTPUT_NAMES.values())} in DIR")
    return parser


def run_show(args: argparse.Namespace) -> int:
    inputs, model_options = model_arguments(args)  # names as `extract` gives them
    paths = show(args.model, inputs, args.out, patch=args.patch, patch_image=args.patch_image,
                 background_threshold=args.background_threshold, img_size=args.img_size, overwrite=args.overwrite,
                 **model_options)
    for path in paths.values():
        print(f"wrote {path}")
    return 0
