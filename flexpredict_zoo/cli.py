"""`flexpredict-zoo`: list, inspect, download, convert, push and extract FlexPredict backbones.

    flexpredict-zoo list
    flexpredict-zoo info flexpredict_vit_b16
    flexpredict-zoo download flexpredict_vit_b16 [--cache-dir DIR] [--revision REV] [--force]
    flexpredict-zoo convert vit-b16.pth.tar --out DIR [--encoder target|context] [--model NAME] [--timm-native]
    flexpredict-zoo push DIR --repo-id ORG/NAME [--private] [--timm-native]
    flexpredict-zoo extract MODEL PATH... --out DIR|FILE.safetensors
    flexpredict-zoo show MODEL PATH... --out DIR [--patch ROW,COL] [--background-threshold T]
    torchrun --nproc_per_node=K -m flexpredict_zoo.cli extract MODEL PATH... --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Type, Union

from . import manifest
from .checkpoints import DOWNLOAD_AGAIN, REINSTALL, CheckpointError, sha256_file, verify_sha256
from .errors import CommandUnavailableError  # also imported from here by older code
from .manifest import UnknownModelError

NOT_RECORDED = "not recorded"
TIMM_NATIVE_HELP = ("write timm's own ViT: stock timm loads it without flexpredict_zoo, with equal outputs at the "
                    "native input size; at other sizes timm interpolates the position embedding (README: Which "
                    "folder)")


# Library errors whose messages are written for users: printed as `error: ...`, exit code 2, no traceback.
USER_ERRORS = (CheckpointError, UnknownModelError, ValueError, OSError, CommandUnavailableError)


def _source_text(source: Mapping[str, Any]) -> str:
    if "hf_hub_id" in source:
        revision = f"@{source['revision']}" if source.get("revision") else ""
        return f"hf-hub:{source['hf_hub_id']}{revision}/{source['hf_hub_filename']}"
    return f"package:{source.get('package_file')}"


def _arch_text(arch: Mapping[str, Any]) -> str:
    return (f"embed {arch['embed_dim']}, depth {arch['depth']}, heads {arch['num_heads']}, patch {arch['patch_size']}, "
            f"{arch['img_size']}px")


def cmd_list(args: argparse.Namespace) -> int:
    models = manifest.load_manifest()["models"]
    for name, entry in models.items():
        print(f"{name}  ({_arch_text(entry['architecture'])})")
        weights = manifest.weight_entries(name)
        if not weights:
            print("    no released weights (pretrained=False, or pretrained_cfg_overlay=dict(file=PATH))")
        for i, w in enumerate(weights):
            default = " (default)" if i == 0 else ""
            print(f"    {w.name}{default}  encoder={w.encoder}  source={_source_text(w.source)}  "
                  f"license={w.license or NOT_RECORDED}  sha256={w.sha256 or NOT_RECORDED}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model, tag = manifest.split_name(args.model)
    entry = manifest.model_entry(model)
    if tag is not None:
        manifest.weight_entry(args.model)  # an unknown tag fails with the known tags
    full = manifest.load_manifest()
    if args.json:
        print(json.dumps({"model": model, **entry}, indent=2))
        return 0
    print(f"{model}: {entry['description']}")
    print(f"  architecture: {_arch_text(entry['architecture'])}, mlp_ratio {entry['architecture']['mlp_ratio']:g}")
    data = entry["data"]
    print(f"  preprocessing: input {tuple(data['input_size'])}, {data['interpolation']}, crop_pct {data['crop_pct']:g} "
          f"({data['crop_mode']}), mean {tuple(data['mean'])}, std {tuple(data['std'])}")
    for w in manifest.weight_entries(model):
        if tag is not None and w.tag != tag:
            continue
        print(f"  weights {w.name}: encoder={w.encoder} ({w.description})")
        print(f"    source: {_source_text(w.source)}")
        print(f"    license: {w.license or NOT_RECORDED}, sha256: {w.sha256 or NOT_RECORDED}")
    if not entry.get("weights"):
        print("  weights: none released")
    recipe = entry.get("pretraining")
    if recipe:
        print("  pretraining: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
        print(f"    reproduce: flexpredict-train --config {recipe['recipe']}")
    results = entry.get("reference_results")
    if results:
        print(f"  reference results ({full.get('reference_source', 'paper')}):")
        for key, value in results.items():
            print(f"    {key}: {value}")
    paper = full["paper"]
    print(f"  paper: {paper['published_title']} ({paper['venue']}), arXiv {paper['arxiv']}; code {paper['official_code']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    entry = manifest.weight_entry(args.model)
    source = entry.source
    if "hf_hub_id" in source:
        revision = args.revision or source.get("revision")
        path = download(source["hf_hub_id"], source["hf_hub_filename"], revision=revision,
                        cache_dir=args.cache_dir, force=args.force)
    else:
        path = manifest.manifest_path().parent / source["package_file"]
    digest = sha256_file(path)
    verify_sha256(path, entry.sha256, DOWNLOAD_AGAIN if "hf_hub_id" in source else REINSTALL)
    print(f"{entry.name}: {path}")
    check = "matches the manifest" if entry.sha256 else "not recorded in the manifest"
    print(f"sha256 {digest} ({check})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint, read_export

    out = convert_checkpoint(args.checkpoint, args.out, model_name=args.model, encoder=args.encoder,
                             overwrite=args.overwrite, timm_native=args.timm_native)
    config, metadata = read_export(out)
    print(f"wrote {out} ({config['architecture']}, {metadata['encoder']} of {metadata['source_file']})")
    plugin = "" if args.timm_native else "  # after import flexpredict_zoo"
    print(f'load with: timm.create_model("local-dir:{out}", pretrained=True){plugin}')
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .push import push_to_hub

    try:
        push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                    commit_message=args.commit_message, timm_native=args.timm_native)
    except HfHubHTTPError as e:
        raise ValueError(f"upload to {args.repo_id} failed: {str(e).splitlines()[0]}. Log in first "
                         f"(`hf auth login` or HF_TOKEN) with write access to that repository.") from e
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id}")
    print(f'load with: timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("extract", help="extract features of image files/folders into a feature store (a folder of "
                                       "shards: any size, resumable, torchrun) or one safetensors file")

    def run(args: argparse.Namespace) -> int:
        from .features import run_extract
        return run_extract(args)

    try:
        from .features import add_extract_arguments
    except ImportError as e:  # features need only inference dependencies; say what is missing if they fail
        def unavailable(args: argparse.Namespace, error: str = str(e)) -> int:
            raise CommandUnavailableError(f"feature extraction is not available: {error}")
        parser.set_defaults(func=unavailable)
        return
    add_extract_arguments(parser)
    parser.set_defaults(func=run)



def _add_show(sub: argparse._SubParsersAction) -> None:
    from .show import add_show_arguments, run_show  # imports matplotlib only when drawing
    parser = sub.add_parser("show", help="pictures of the patch features: PCA as RGB, patch-similarity maps, a "
                                         "contact sheet and a clickable HTML page")
    add_show_arguments(parser)
    parser.set_defaults(func=run_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexpredict-zoo", description="FlexPredict (StoP) ViT backbones for timm: "
                                     "released weights, conversion, upload and feature extraction.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="models, weight tags, sources, licenses and sha256")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="everything the manifest holds for one model")
    p.add_argument("model", metavar="MODEL[.TAG]")
    p.add_argument("--json", action="store_true", help="print the manifest entry as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", help="fetch released weights into the Hugging Face cache and print their sha256")
    p.add_argument("model", metavar="MODEL[.TAG]")
    p.add_argument("--cache-dir", type=Path, default=None, help="hub cache folder (default: HF_HUB_CACHE / HF_HOME)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repository")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="official checkpoint -> timm folder (model.safetensors + config.json)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="official .pth.tar, a safetensors file or state dict")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--encoder", choices=["target", "context"], default="target",
                   help="target: the EMA encoder the paper evaluates (default); context: the online encoder")
    p.add_argument("--model", default=None, metavar="NAME", help="model name (default: inferred from the shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace model.safetensors/config.json in DIR")
    p.add_argument("--timm-native", action="store_true", help=TIMM_NATIVE_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push", help="upload a converted folder with a model card to the Hugging Face Hub")
    p.add_argument("folder", metavar="DIR", type=Path)
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    p.add_argument("--commit-message", default="Add FlexPredict backbone (flexpredict-zoo convert)")
    p.add_argument("--timm-native", action="store_true", help=TIMM_NATIVE_HELP + " (a plugin folder is rewritten "
                   "into a temporary folder for the upload)")
    p.set_defaults(func=cmd_push)

    _add_extract(sub)
    _add_show(sub)
    return parser


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def run_command(func: Callable[[Any], Optional[int]], args: Any,
                extra_user_errors: Callable[[], Tuple[Type[BaseException], ...]] = tuple) -> int:
    """Run one command of `flexpredict-zoo` or `flexpredict-train` and return its exit code. The one place where
    errors meet the user: a user error (USER_ERRORS, plus `extra_user_errors()` of the calling CLI, looked up
    only when something failed) is one `error: MESSAGE` line on stderr and exit code 2, without a traceback;
    anything else is a bug and keeps its traceback."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .atomic_write import DiskFullError, is_disk_full
        if is_disk_full(e) and not isinstance(e, DiskFullError):  # a write outside atomic_write (a log line, ...)
            print(f"error: no space left on device ({type(e).__name__}: {str(e).splitlines()[0][:200]}); free space "
                  f"where this command writes, then run it again", file=sys.stderr)
            return 2
        if not isinstance(e, USER_ERRORS + tuple(extra_user_errors())):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Union[argparse.Namespace, int]:
    """parser.parse_args(argv), or the exit code of --help (0) and usage errors (2, argparse's own message)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_or_exit_code(build_parser(), sys.argv[1:] if argv is None else argv)
    if isinstance(args, int):
        return args
    return run_command(args.func, args)


if __name__ == "__main__":  # `python -m flexpredict_zoo.cli` (torchrun)
    sys.exit(main())
