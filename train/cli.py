"""`flexpredict-train`: train from a config, or dispatch a subcommand (export, eval, demo, bench, slurm, plot).

    flexpredict-train --config vit_b16 data.root=/data/imagenet run.output_dir=runs/b16
    torchrun --nproc_per_node=8 -m flexpredict_zoo.train --config vit_b16 data.root=/data/imagenet
    flexpredict-train export RUN_DIR --out DIR
    flexpredict-train plot RUN_DIR [RUN_DIR...] --out FILE.png
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional, Tuple

from flexpredict_zoo.cli import parse_or_exit_code, run_command
from flexpredict_zoo.errors import CommandUnavailableError

# subcommand -> module of flexpredict_zoo.train providing add_arguments(parser) and run(args) -> int.
# Imported lazily, so a missing optional piece only breaks its own subcommand.
SUBCOMMANDS = {
    "export": ("export", "write a trained run into the zoo format (safetensors + timm config + manifest entry)"),
    "eval": ("evaluate", "k-NN / linear-probe top-1 of a checkpoint's target encoder"),
    "demo": ("demo", "the embedded demo: pretrained vs random vs pixels on the digits held-out split"),
    "bench": ("bench", "train-step throughput benchmark"),
    "slurm": ("slurm", "submit a training run to SLURM through submitit"),
    "plot": ("plot", "draw loss, lr, weight decay, momentum, images/s and memory of runs from their log.csv"),
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


def _user_errors() -> tuple:
    """The training package's errors written for users, beside the zoo's own (flexpredict_zoo.cli.USER_ERRORS;
    config errors are ValueErrors). Imported only once something has failed."""
    from .engine import NonFiniteLossError, UnreadableDataError
    from .masks import MaskSamplingError
    from .run_checkpoint import ResumeError
    return (ResumeError, UnreadableDataError, NonFiniteLossError, MaskSamplingError)


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .engine import train
    summary = train(cfg)
    loss = summary["final_loss"]
    print(f"trained {summary['iterations']} iterations ({summary['steps_this_run']} in this run), final loss "
          f"{loss:.5f}" if loss is not None else f"nothing to do: the run is already at iteration "
          f"{summary['iterations']}", end="")
    print(f"; checkpoint {summary['checkpoint']}")
    return 0


def _subcommand(name: str) -> Tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]:
    """(parser, run) of a subcommand, importing its module now: a missing optional piece breaks only its own."""
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ImportError as e:
        raise CommandUnavailableError(f"{PROG} {name} is not available ({e}); install what it needs: "
                                      f"pip install 'flexpredict-zoo[train]'") from e
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=help_)
    module.add_arguments(parser)
    return parser, module.run


def _dispatch(argv: List[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        (parser, run), rest = _subcommand(argv[0]), argv[1:]
    else:
        parser, run, rest = build_train_parser(), _train, argv[1:] if argv and argv[0] == "train" else argv
    args = parse_or_exit_code(parser, rest)
    return args if isinstance(args, int) else int(run(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Every command, training included, answers a user error with one `error: ...` line and exit code 2
    (flexpredict_zoo.cli.run_command, shared with flexpredict-zoo)."""
    return run_command(_dispatch, list(sys.argv[1:] if argv is None else argv), _user_errors)


if __name__ == "__main__":
    raise SystemExit(main())
