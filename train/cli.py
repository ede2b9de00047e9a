"""`flexpredict-train`: train from a config, or dispatch a subcommand (export, eval, demo, bench, slurm).

    flexpredict-train --config vit_b16 data.root=/data/imagenet run.output_dir=runs/b16
    torchrun --nproc_per_node=8 -m flexpredict_zoo.train --config vit_b16 data.root=/data/imagenet
    flexpredict-train export RUN_DIR --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> module of flexpredict_zoo.train providing add_arguments(parser) and run(args) -> int.
# Imported lazily, so a missing optional piece only breaks its own subcommand.
SUBCOMMANDS = {
    "export": ("export", "write a trained run into the zoo format (safetensors + timm config + manifest entry)"),
    "eval": ("evaluate", "k-NN / linear-probe top-1 of a checkpoint's target encoder"),
    "demo": ("demo", "the embedded demo: pretrained vs random vs pixels on the digits held-out split"),
    "bench": ("bench", "train-step throughput benchmark"),
    "slurm": ("slurm", "submit a training run to SLURM through submitit"),
}
PROG = "flexpredict-train"


def build_train_parser(prog: str = PROG) -> argparse.ArgumentParser:
    subcommands = "\n".join(f"  {name:8s}{help_}" for name, (_, help_) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a FlexPredict (StoP) ViT. Any config key can be overridden as section.key=value.",
        epilog=f"subcommands ({prog} SUBCOMMAND --help):\n{subcommands}\n\nshipped configs: "
               "vit_b16, vit_l16, vit_h16 (official recipes), tiny_cpu, digits_m4_32")
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a YAML file, or a shipped config name (vit_b16, vit_l16, vit_h16, tiny_cpu, digits_m4_32)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides, e.g. data.root=/data/imagenet optim.lr_peak=1e-3 run.max_steps=100")


def _config_error(prog: str, error: Exception) -> int:
    print(f"{prog}: config error: {error}", file=sys.stderr)
    return 2


def _train(argv: List[str]) -> int:
    from .config import ConfigError, load_config
    args = build_train_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _config_error(PROG, e)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .engine import NonFiniteLossError, UnreadableDataError, train
    from .run_checkpoint import ResumeError
    try:
        summary = train(cfg)
    except ConfigError as e:
        return _config_error(PROG, e)
    except (NonFiniteLossError, UnreadableDataError, ResumeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    loss = summary["final_loss"]
    print(f"trained {summary['iterations']} iterations ({summary['steps_this_run']} in this run), final loss "
          f"{loss:.5f}" if loss is not None else f"nothing to do: the run is already at iteration "
          f"{summary['iterations']}", end="")
    print(f"; checkpoint {summary['checkpoint']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
        module_name, help_ = SUBCOMMANDS[name]
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ImportError as e:
            print(f"{PROG} {name}: not available ({e})", file=sys.stderr)
            return 1
        parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=help_)
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)) or 0)
    if argv and argv[0] == "train":
        argv = argv[1:]
    return _train(argv)


if __name__ == "__main__":
    raise SystemExit(main())
