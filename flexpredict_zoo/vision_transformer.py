"""The FlexPredict (StoP) ViT encoder as a timm model.

timm's VisionTransformer with no class token, mean pooling over the final-normed tokens and a fixed
MAE/I-JEPA-layout sin-cos position embedding (a non-persistent buffer, regenerated exactly for any grid
instead of interpolated). `forward_masked` is the context-encoder forward the trainer uses, so the
class that is trained is the class that is served.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Union

import torch
from timm.layers import resample_patch_embed
from timm.models import (build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model,
                         resolve_pretrained_cfg)
from timm.models.vision_transformer import VisionTransformer

from . import manifest
from .checkpoints import (REINSTALL, SAFETENSORS_NAME, check_fits, encoder_state_dict, load_file,
                          resolve_weight_file, strip_prefix, verify_sha256)
from .hub import download
from .pos_embed import sincos_2d

__all__ = ["FlexPredictViT", "checkpoint_filter_fn", "gather_tokens"]

FIRST_CONV = "patch_embed.proj"
# What timm's load_pretrained needs to adapt a FlexPredict weight file (no classifier, RGB input).
_WEIGHT_FILE_CFG = dict(first_conv=FIRST_CONV, classifier="head", num_classes=0, input_size=(3, 224, 224))


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), indices (B, K) -> (B, K, D): one batched gather, no Python loop."""
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class FlexPredictViT(VisionTransformer):
    def __init__(self, **kwargs: Any):
        kwargs.setdefault("global_pool", "avg")
        kwargs.setdefault("num_classes", 0)
        for key, value in dict(class_token=False, pos_embed="none", fc_norm=False, reg_tokens=0).items():
            if kwargs.pop(key, value) != value:
                raise ValueError(f"FlexPredictViT requires {key}={value!r} (the FlexPredict architecture)")
        kwargs.setdefault("norm_layer", None)  # timm default: LayerNorm eps 1e-6, as the official encoder
        super().__init__(class_token=False, pos_embed="none", fc_norm=False, **kwargs)
        self._set_pos_embed()

    def _set_pos_embed(self) -> None:
        # Fixed, never learned: a non-persistent buffer, so state dicts carry no position embedding. It takes the
        # device and dtype of the weights, so create_model(device=..., dtype=...) and set_input_size keep them.
        grid = tuple(self.patch_embed.grid_size)
        if "pos_embed" in self.__dict__:  # timm's pos_embed='none' leaves a plain attribute
            del self.pos_embed
        self._buffers.pop("pos_embed", None)
        weight = self.patch_embed.proj.weight
        self.register_buffer("pos_embed", sincos_2d(self.embed_dim, grid, dtype=weight.dtype, device=weight.device),
                             persistent=False)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        self._buffers["pos_embed"] = None  # let timm resize the patch embedding without resampling anything
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._set_pos_embed()

    def _grid_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        if (rows, cols) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return sincos_2d(self.embed_dim, (rows, cols), dtype=self.pos_embed.dtype, device=self.pos_embed.device)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # The buffer keeps the model's dtype: under bf16 autocast with fp32 weights, adding it promotes the
        # residual stream to fp32, as the official encoder (and timm) do.
        if self.dynamic_img_size:  # patch_embed gives NHWC
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C) + self._grid_pos_embed(H, W)
        else:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_masked(self, x: torch.Tensor, masks: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None
                       ) -> torch.Tensor:
        """Encode only the kept tokens: masks are (B, K) patch indices (one tensor or a list, as the official
        code passes them); the outputs for several masks are concatenated along the batch (mask-major)."""
        x = self._pos_embed(self.patch_embed(x))
        if masks is not None:
            masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
            x = torch.cat([gather_tokens(x, m) for m in masks], dim=0)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # timm's list names pos_embed, a learned parameter there; here it is a fixed buffer.
        return super().no_weight_decay() - {"pos_embed"}

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """timm's custom-load hook: read the weight file safely (memory-mapped, weights_only), take the encoder,
        then hand it to timm's own loader, which adapts the first conv to `in_chans` and drops the classifier
        for `num_classes`, as for timm's own models."""
        cfg = dict(_WEIGHT_FILE_CFG, **(getattr(self, "pretrained_cfg", None) or {}))
        source = str(resolve_weight_file(checkpoint_path))
        state_dict = encoder_state_dict(load_file(source), _encoder_key(cfg), source=source)
        load_pretrained(self, pretrained_cfg=dict(cfg, state_dict=state_dict, file=source, source=""),
                        num_classes=self.num_classes, in_chans=self.in_chans,
                        filter_fn=lambda sd, model: checkpoint_filter_fn(sd, model, source=source))


def _manifest_entry(pretrained_cfg: Mapping[str, Any]) -> Optional[manifest.WeightEntry]:
    """The manifest weights that a pretrained cfg names (architecture + tag), if any."""
    if not (pretrained_cfg.get("architecture") and pretrained_cfg.get("tag")):
        return None
    try:
        return manifest.weight_entry(f"{pretrained_cfg['architecture']}.{pretrained_cfg['tag']}")
    except KeyError:
        return None


def _encoder_key(pretrained_cfg: Mapping[str, Any]) -> str:
    """Which encoder of an official training checkpoint to load: the manifest entry's, else the EMA target encoder."""
    entry = _manifest_entry(pretrained_cfg)
    return entry.encoder if entry is not None else "target_encoder"


def _weights_source(pretrained_cfg: Mapping[str, Any]) -> str:
    """The weights that timm's own loader read for an export (hf-hub:ORG/NAME, local-dir:DIR), as errors name them.
    Other callers know their file and pass it to checkpoint_filter_fn."""
    if pretrained_cfg.get("source") == "hf-hub" and pretrained_cfg.get("hf_hub_id"):
        return f"the weights of Hugging Face Hub repository {pretrained_cfg['hf_hub_id']}"
    if pretrained_cfg.get("source") == "local-dir" and pretrained_cfg.get("file"):
        folder = Path(pretrained_cfg["file"])
        return str(folder / SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else folder)
    return "the given state dict"


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: FlexPredictViT,
                         source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Map an official StoP checkpoint (training dict or encoder state dict, `module.` keys) or an exported
    state dict to this model's keys, dropping the fixed position embedding; raise, naming `source` (the weight
    file, which timm's loader does not pass), if it does not fit."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    source = source or _weights_source(cfg)
    state_dict = encoder_state_dict(state_dict, _encoder_key(cfg), source=source)
    state_dict = {k: v for k, v in strip_prefix(state_dict).items() if k != "pos_embed"}
    expected = model.state_dict()
    if getattr(model, "num_classes", 0) == 0 or any(k.startswith("head.") and k not in expected for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    weight_key, proj = f"{FIRST_CONV}.weight", state_dict.get(f"{FIRST_CONV}.weight")
    if proj is not None and proj.ndim == 4 and weight_key in expected:
        model_proj = expected[weight_key]
        if proj.shape[-2:] != model_proj.shape[-2:]:  # another patch_size: resample the kernel, as timm's ViTs do
            proj = state_dict[weight_key] = resample_patch_embed(proj, list(model_proj.shape[-2:]), verbose=True)
        file_chans = (cfg.get("input_size") or _WEIGHT_FILE_CFG["input_size"])[0]
        if proj.shape[1] == file_chans != model_proj.shape[1]:  # timm's load_pretrained adapts it to in_chans next
            expected = dict(expected, **{weight_key: torch.empty(model_proj.shape[:1] + proj.shape[1:], device="meta")})
    check_fits(state_dict, expected, source=source,
               what=f"{type(model).__name__} (embed_dim={model.embed_dim}, depth={len(model.blocks)})")
    return state_dict


def _weight_path(cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]]) -> Path:
    """Where the weights of a resolved pretrained cfg are on disk, downloading and checking them as needed."""
    entry = _manifest_entry(cfg)
    if cfg.get("file"):
        path = Path(cfg["file"])
        packaged = entry is not None and "package_file" in entry.source and \
            path.resolve() == (manifest.manifest_path().parent / entry.source["package_file"]).resolve()
        if packaged:
            verify_sha256(path, entry.sha256, REINSTALL)
        return path
    if cfg.get("hf_hub_id") and cfg.get("hf_hub_filename"):
        path = download(cfg["hf_hub_id"], cfg["hf_hub_filename"], cache_dir=cache_dir)
        recorded = manifest.find_weight_entry(cfg["hf_hub_id"], cfg["hf_hub_filename"])
        verify_sha256(path, recorded.sha256 if recorded else None)
        return path
    raise RuntimeError(f"{cfg.get('architecture')} has no pretrained weights; use pretrained=False, or pass a file "
                       f"with pretrained_cfg_overlay=dict(file=PATH)")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> FlexPredictViT:
    arch = manifest.model_entry(variant)["architecture"]
    model_args = dict(arch, **{k: kwargs.pop(k) for k in list(kwargs) if k in arch})
    cache_dir = kwargs.get("cache_dir")
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                 pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None)).to_dict()
    if pretrained and cfg.get("source") not in ("hf-hub", "local-dir"):
        # Registry weights and local files: fetch (and check) here, then timm calls
        # FlexPredictViT.load_pretrained, which memory-maps the file and takes the encoder only.
        cfg.update(file=str(_weight_path(cfg, cache_dir)), custom_load=True)
    # Converted exports (hf-hub:ORG/NAME, local-dir:DIR) hold plain safetensors: timm's own path, same filter.
    return build_model_with_cfg(
        FlexPredictViT, variant, pretrained, pretrained_cfg=cfg, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"), **model_args, **kwargs)


default_cfgs = generate_default_cfgs(manifest.pretrained_cfgs())


@register_model
def flexpredict_vit_ti16(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_ti16", pretrained, **kwargs)


@register_model
def flexpredict_vit_s16(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_s16", pretrained, **kwargs)


@register_model
def flexpredict_vit_b16(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_b16", pretrained, **kwargs)


@register_model
def flexpredict_vit_l16(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_l16", pretrained, **kwargs)


@register_model
def flexpredict_vit_h16(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_h16", pretrained, **kwargs)


@register_model
def flexpredict_vit_m4_32(pretrained: bool = False, **kwargs) -> FlexPredictViT:
    return _create("flexpredict_vit_m4_32", pretrained, **kwargs)
