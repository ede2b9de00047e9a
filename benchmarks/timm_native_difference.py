"""How far a timm-native folder (`flexpredict-zoo convert --timm-native`) is from the plugin, by input size.

    python benchmarks/timm_native_difference.py --model flexpredict_vit_b16 --sizes 224 320 160
    python benchmarks/timm_native_difference.py --model flexpredict_vit_m4_32.digits_stop --pretrained \
        --inputs digits --count 500 --sizes 32 48 24

Both folders are written from one model by `write_model_folder` (plugin format, and `timm_native=True`) into a
temporary folder and loaded the way users load them, `timm.create_model("local-dir:DIR", pretrained=True,
img_size=SIZE)`. At another size the plugin regenerates its sin-cos position embedding exactly for the new grid;
stock timm resamples the stored 14x14 (or 8x8) embedding (bicubic). Inputs: digits images (the shipped model's
data, upsampled to SIZE) with --inputs digits, else standard normal noise. Reported per size: max |difference| of
the pooled features and of the patch tokens (forward_features), the largest relative L2 error of a pooled
vector, the smallest and mean cosine similarity of pooled vectors, and the smallest of tokens.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn.functional as F


def difference(plugin: torch.nn.Module, native: torch.nn.Module, images: torch.Tensor) -> Dict[str, float]:
    with torch.no_grad():
        tokens_p, tokens_n = plugin.forward_features(images), native.forward_features(images)
        pooled_p, pooled_n = plugin.forward_head(tokens_p), native.forward_head(tokens_n)
    return {"pooled_max_abs": (pooled_p - pooled_n).abs().max().item(),
            "tokens_max_abs": (tokens_p - tokens_n).abs().max().item(),
            "pooled_max_rel_l2": ((pooled_p - pooled_n).norm(dim=-1) / pooled_p.norm(dim=-1)).max().item(),
            "pooled_min_cosine": F.cosine_similarity(pooled_p, pooled_n, dim=-1).min().item(),
            "pooled_mean_cosine": F.cosine_similarity(pooled_p, pooled_n, dim=-1).mean().item(),
            "tokens_min_cosine": F.cosine_similarity(tokens_p, tokens_n, dim=-1).min().item(),
            "pooled_max_abs_value": pooled_p.abs().max().item()}


def inputs(kind: str, size: int, count: int, seed: int) -> torch.Tensor:
    if kind == "digits":
        from flexpredict_zoo.train.data import DigitsDataset
        return DigitsDataset("heldout", img_size=size).tensors[:count]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def measure(model_name: str, pretrained: bool, sizes: Sequence[int], kind: str, count: int, seed: int) -> list:
    import timm

    import flexpredict_zoo  # noqa: F401  (registers the models)
    from flexpredict_zoo.convert import write_model_folder

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=pretrained).eval()
    arch = model_name.split(".")[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plugin_dir = write_model_folder(Path(tmp) / "plugin", model, arch, "target")
        native_dir = write_model_folder(Path(tmp) / "native", model, arch, "target", timm_native=True)
        for size in sizes:
            plugin = timm.create_model(f"local-dir:{plugin_dir}", pretrained=True, img_size=size).eval()
            native = timm.create_model(f"local-dir:{native_dir}", pretrained=True, img_size=size).eval()
            images = inputs(kind, size, count, seed)
            rows.append({"model": model_name, "pretrained": pretrained, "size": size, "inputs": kind,
                         "timm_version": timm.__version__, **difference(plugin, native, images)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flexpredict_vit_b16", help="model name, with a tag for --pretrained")
    parser.add_argument("--pretrained", action="store_true", help="released weights (default: seeded random init)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--inputs", choices=("noise", "digits"), default="noise")
    parser.add_argument("--count", type=int, default=8, help="images per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.model, args.pretrained, args.sizes, args.inputs, args.count, args.seed)
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{row['model']} {row['size']}px ({row['inputs']}, timm {row['timm_version']}): pooled max |diff| "
              f"{row['pooled_max_abs']:.3g} (of values up to {row['pooled_max_abs_value']:.3g}; relative L2 "
              f"{row['pooled_max_rel_l2']:.3g}), tokens max |diff| {row['tokens_max_abs']:.3g}; cosine pooled min "
              f"{row['pooled_min_cosine']:.6f} mean {row['pooled_mean_cosine']:.6f}, tokens min "
              f"{row['tokens_min_cosine']:.6f}")


if __name__ == "__main__":
    main()
