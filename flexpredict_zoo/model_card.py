"""Model cards: `MODEL_CARD.md` generated from `weights_manifest.json`, and the README of an uploaded export.

    python -m flexpredict_zoo.model_card           # write MODEL_CARD.md at the repository root
    python -m flexpredict_zoo.model_card --check   # exit 1 if the committed card differs from the manifest
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from .manifest import load_manifest

CARD_NAME = "MODEL_CARD.md"
# Display names of the manifest's reference_results keys, in the order the paper's tables give them.
RESULT_LABELS = {
    "in1k_linear_top1_last_layer": "ImageNet-1k linear probe, top-1 (last layer)",
    "in1k_linear_top1_last_4_layers": "ImageNet-1k linear probe, top-1 (last 4 layers)",
    "in1k_1pct_top1": "ImageNet-1k, 1% labels, top-1",
    "ijepa_in1k_linear_top1_last_layer": "I-JEPA baseline: ImageNet-1k linear, top-1 (last layer)",
    "ijepa_in1k_linear_top1_last_4_layers": "I-JEPA baseline: ImageNet-1k linear, top-1 (last 4 layers)",
    "cifar100_linear": "CIFAR-100 linear",
    "places205_linear": "Places205 linear",
    "inat18_linear": "iNat18 linear",
    "clevr_count": "CLEVR count",
    "clevr_dist": "CLEVR dist",
    "davis_jf": "DAVIS J&F",
}
NOT_RECORDED = "not recorded"
# Which folder to choose, said the same way in MODEL_CARD.md and in the card of every pushed folder.
FOLDER_CHOICE = (
    "Two folder formats. The plugin folder (default) names the FlexPredict architecture: it needs "
    "`import flexpredict_zoo` before `timm.create_model`, and it is exact at any input size (the fixed sin-cos "
    "position embedding is regenerated for each grid), with everything the plugin adds (released tags, checksums, "
    "`flexpredict_zoo.encoders.load_encoder`). The timm-native folder (`--timm-native` on `flexpredict-zoo convert`, "
    "`flexpredict-zoo push` and `flexpredict-train export`) is timm's own `VisionTransformer` (no class token, mean "
    "pooling after the final norm, the sin-cos embedding stored as its `pos_embed` weights): stock timm loads it "
    "with nothing else installed, with outputs equal to the plugin's at the native input size; at other sizes "
    "timm interpolates the stored embedding (bicubic) where the plugin regenerates it, so features differ there "
    "(README, \"Which folder\", gives the measured differences). Choose native to share weights with people "
    "who only have timm and use the native size; choose the plugin for other sizes or exact reproduction.")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _source_text(source: Mapping[str, Any]) -> str:
    if "hf_hub_id" in source:
        revision = source.get("revision") or "main"
        return f"`{source['hf_hub_id']}` / `{source['hf_hub_filename']}` (revision {revision})"
    return f"packaged file `{source.get('package_file')}`"


def _architecture_line(arch: Mapping[str, Any]) -> str:
    return (f"ViT, embed_dim {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, patch "
            f"{arch['patch_size']}, MLP ratio {arch['mlp_ratio']:g}, input {arch['img_size']}x{arch['img_size']}; "
            f"no class token, fixed 2-D sin-cos position embedding (MAE/I-JEPA layout), final LayerNorm, "
            f"mean over tokens")


def _results_table(models: Mapping[str, Any]) -> List[str]:
    with_results = [name for name, entry in models.items() if entry.get("reference_results")]
    if not with_results:
        return []
    keys: List[str] = [k for k in RESULT_LABELS if any(k in models[m]["reference_results"] for m in with_results)]
    keys += sorted({k for m in with_results for k in models[m]["reference_results"]} - set(keys))
    lines = ["| result | " + " | ".join(f"`{m}`" for m in with_results) + " |",
             "|---|" + "---|" * len(with_results)]
    for key in keys:
        cells = [f"{models[m]['reference_results'][key]:.1f}" if key in models[m]["reference_results"] else "-"
                 for m in with_results]
        lines.append(f"| {RESULT_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    return lines


def _model_section(name: str, entry: Mapping[str, Any]) -> List[str]:
    arch, data = entry["architecture"], entry["data"]
    out = [f"### `{name}`", "", entry["description"] + ".", "",
           f"- Architecture: {_architecture_line(arch)}.",
           f"- Preprocessing: input {'x'.join(str(s) for s in data['input_size'])}, {data['interpolation']} resize, "
           f"crop_pct {data['crop_pct']:g} ({data['crop_mode']} crop), mean {tuple(data['mean'])}, "
           f"std {tuple(data['std'])}.", ""]
    weights = entry.get("weights", [])
    if weights:
        out += ["| tag | encoder | source | license | sha256 |", "|---|---|---|---|---|"]
        for i, w in enumerate(weights):
            tag = f"`{w['tag']}`" + (" (default)" if i == 0 else "")
            sha = f"`{w['sha256']}`" if w.get("sha256") else NOT_RECORDED
            out.append(f"| {tag} | `{w['encoder']}`: {w['description']} | {_source_text(w['source'])} | "
                       f"{w.get('license', NOT_RECORDED)} | {sha} |")
        out += ["", "```python", "import timm, flexpredict_zoo", "",
                f'model = timm.create_model("{name}", pretrained=True)  # {weights[0]["tag"]}, {weights[0]["encoder"]}']
        for w in weights[1:]:
            out.append(f'model = timm.create_model("{name}.{w["tag"]}", pretrained=True)  # {w["encoder"]}')
        out += ["```", ""]
    else:
        out += ["No released weights: build it with `pretrained=False` (training, tests), or load your own with "
                "`pretrained_cfg_overlay=dict(file=PATH)`.", "",
                "```python", "import timm, flexpredict_zoo", "",
                f'model = timm.create_model("{name}", pretrained=False)', "```", ""]
    for w in weights:
        out += _trained_here(name, w)
    recipe = entry.get("pretraining")
    if recipe:
        out += [f"Pretraining: {recipe['dataset']}, {recipe['epochs']} epochs, positional noise std (sigma) "
                f"{recipe['noise_std']:g}, predictor depth {recipe['predictor_depth']} at width "
                f"{recipe['predictor_embed_dim']}. Reproduce with "
                f"`flexpredict-train --config {recipe['recipe']}`.", ""]
    return out


# One label per manifest.EVALUATION_REPRESENTATIONS entry, in its order.
REPRESENTATION_LABELS = {"pretrained": "FlexPredict (pretrained)", "random_init": "same encoder, random init",
                         "pixels": "raw pixels"}


def _training_sentence(name: str, training: Mapping[str, Any]) -> str:
    """One sentence from a manifest `training` record (keys: manifest.TRAINING_KEYS; optional ones when present)."""
    recipe = f" with `{training['recipe']}`" if training.get("recipe") else ""
    processes = f" over {training['world_size']} processes" if training.get("world_size", 1) != 1 else ""
    predictor = "".join(
        [f", positional noise std {training['noise_std']:g}" if "noise_std" in training else "",
         f", predictor depth {training['predictor_depth']}" if "predictor_depth" in training else ""])
    minutes, hardware = training.get("wall_time_min"), training.get("hardware")
    where = (f", {minutes:.0f} minutes on {hardware}" if minutes is not None and hardware else
             f", {minutes:.0f} minutes" if minutes is not None else f", on {hardware}" if hardware else "")
    reproduce = f" Reproduce: `{training['command']}`." if training.get("command") else ""
    return (f"`{name}` was trained by `flexpredict-train`{recipe} on {training['dataset']}: "
            f"{training['iterations']} iterations ({training['epochs']} epochs), batch {training['batch_size']}"
            f"{processes}, seed {training['seed']}{predictor}{where}, final loss {training['final_loss']:.4f}."
            f"{reproduce}")


def _trained_here(name: str, weights: Mapping[str, Any]) -> List[str]:
    """How weights made by this package were trained and what they measured (manifest `training`/`evaluation`)."""
    out: List[str] = []
    training = weights.get("training")
    if training:
        out += [_training_sentence(f"{name}.{weights['tag']}", training), ""]
    evaluation = weights.get("evaluation")
    if evaluation:
        out += [f"Measured by this package ({evaluation['protocol']}; `{evaluation['command']}`), top-1 in percent, "
                f"one training run per seed; the shipped weights are seed {evaluation['shipped_seed']}:", "",
                "| seed | representation | k-NN | linear | 5-shot |", "|---|---|---|---|---|"]
        for seed, results in evaluation["seeds"].items():
            for key, label in REPRESENTATION_LABELS.items():
                r = results[key]
                out.append(f"| {seed} | {label} | {r['knn_top1']:.1f} | {r['linear_top1']:.1f} | "
                           f"{r['few_shot_top1']:.1f} |")
        out.append("")
    return out


def render_model_card(manifest: Optional[Mapping[str, Any]] = None) -> str:
    """MODEL_CARD.md text for a manifest (the packaged one by default); deterministic, so it can be checked."""
    manifest = manifest if manifest is not None else load_manifest()
    paper, models = manifest["paper"], manifest["models"]
    licenses = sorted({w.get("license") for e in models.values() for w in e.get("weights", []) if w.get("license")})
    lines = [
        "# FlexPredict Zoo: model card", "",
        "<!-- Generated from flexpredict_zoo/weights_manifest.json by `python -m flexpredict_zoo.model_card`; "
        "do not edit by hand. -->", "",
        f"{paper['method']} ViT backbones for timm. Paper: \"{paper['title']}\" "
        f"({paper['authors']}; arXiv {paper['arxiv']}), published at {paper['venue']} as "
        f"\"{paper['published_title']}\". Official code: {paper['official_code']}.", "",
        "The method is I-JEPA with stochastic positional embeddings: the predictor sees the positions of the "
        "masked tokens through Gaussian noise. The backbones below are the encoders; the predictor is only used in "
        "pretraining.", "",
        "## Intended use and license", "",
        "Frozen or fine-tuned image features (linear probing, retrieval, dense tasks) for research. Licenses of "
        f"the weights: {', '.join(licenses) or NOT_RECORDED} (each tag's license is in its table below; the "
        "ImageNet weights released with the paper are non-commercial, as the official release). The default "
        "tag of each model is the EMA `target_encoder`, the encoder the paper evaluates; the `_context` tag is the "
        "context (online) encoder.", "",
        "## Reference results", "",
        f"Numbers reported in the paper, not measured with this package: {manifest.get('reference_source', '')}.", "",
    ]
    lines += _results_table(models) + [""]
    lines += ["## Models", ""]
    for name, entry in models.items():
        lines += _model_section(name, entry)
    lines += ["## Files and checks", "",
              "Released files are official training checkpoints (optimizer state included, `module.` keys); they are "
              "read with `weights_only=True`, memory-mapped, and only the chosen encoder is loaded. Where a sha256 "
              "is recorded above it is verified before use; `flexpredict-zoo download MODEL` prints the sha256 of "
              "what it fetched. `flexpredict-zoo convert` writes a timm folder (`model.safetensors`, "
              "`config.json`) for `timm.create_model(\"local-dir:DIR\")` or, once pushed, "
              "`timm.create_model(\"hf-hub:ORG/NAME\")`; the same input gives the same bytes, so a folder's "
              "sha256 can be pinned.", "", FOLDER_CHOICE, "",
              "## Citation", "", "```bibtex",
              "@inproceedings{bar2024stochastic,",
              f"  title = {{{paper['published_title']}}},",
              f"  author = {{{' and '.join(a.strip() for a in paper['authors'].split(','))}}},",
              "  booktitle = {International Conference on Machine Learning (ICML)},", "  year = {2024},",
              f"  note = {{arXiv:{paper['arxiv']}}}", "}", "```", ""]
    return "\n".join(lines)


def render_hub_card(config: Mapping[str, Any], metadata: Mapping[str, str], repo_id: str) -> str:
    """README.md for a converted folder uploaded to the Hub (`flexpredict-zoo push`), plugin or timm-native."""
    paper = load_manifest()["paper"]
    cfg = config.get("pretrained_cfg", {})
    native = "flexpredict" in config
    name = config["flexpredict"]["architecture"] if native else config["architecture"]
    license_id = cfg.get("license") or "other"
    source = metadata.get("source_file", NOT_RECORDED)
    sha = metadata.get("source_sha256") or NOT_RECORDED
    if native:
        size = "x".join(str(s) for s in cfg.get("input_size", [])[1:]) or NOT_RECORDED
        what = (f"FlexPredict (StoP) backbone `{name}` as timm's own `{config['architecture']}` (converted with "
                f"`--timm-native`): stock timm loads it, no plugin needed; outputs equal the plugin's at {size}")
        load = ["import timm  # stock timm is enough", ""]
        install = "Nothing to install beyond timm; `pip install flexpredict-zoo` adds the plugin (see below)."
    else:
        what = f"FlexPredict (StoP) backbone `{name}` for timm, converted with `flexpredict-zoo convert`"
        load = ["import timm, flexpredict_zoo  # flexpredict_zoo registers the architecture", ""]
        install = "Install with `pip install flexpredict-zoo`."
    return "\n".join([
        "---", f"license: {license_id}", "library_name: timm",
        "tags:", "- image-feature-extraction", "- timm", "- flexpredict", "- stop", "---", "",
        f"# {repo_id}", "",
        f"{cfg.get('description', name)}. {what}.", "",
        f"- Encoder: `{metadata.get('encoder', NOT_RECORDED)}` (`target_encoder` is the EMA encoder the paper "
        "evaluates)",
        f"- Converted from: `{source}` (sha256 {sha})",
        f"- Features: {config.get('num_features')} per image (mean over tokens), no classifier head",
        f"- License: {license_id}", "",
        "## How to load", "", "```python", *load,
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "features = model(transform(image).unsqueeze(0))  # (1, num_features)", "```", "",
        install, "", "## Which folder", "", FOLDER_CHOICE, "",
        "## Paper", "",
        f"\"{paper['published_title']}\" ({paper['venue']}), arXiv {paper['arxiv']} "
        f"(\"{paper['title']}\"). Official code: {paper['official_code']}.", ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexpredict_zoo.model_card", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the card differs from the generator output")
    parser.add_argument("--output", type=Path, default=_repo_root() / CARD_NAME, help="where the card is")
    args = parser.parse_args(argv)
    text = render_model_card()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date with weights_manifest.json: run `python -m flexpredict_zoo.model_card`",
                  file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
