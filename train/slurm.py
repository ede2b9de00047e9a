"""`flexpredict-train slurm`: submit a training run to SLURM with submitit (optional extra: pip install submitit).

One task per GPU; each task joins the process group through the torchrun-style variables that submitit's
TorchDistributedEnvironment exports. On preemption or timeout the job requeues itself and resumes from
RUN_DIR/checkpoints/latest.pt (run.resume=auto).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flexpredict_zoo.errors import CommandUnavailableError

from .cli import PROG, add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=10, help="data-loading workers + 1 is a good value")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--timeout-min", type=int, default=72 * 60)
    parser.add_argument("--mem-gb", type=int, default=None, help="per node")
    parser.add_argument("--job-name", default="flexpredict")
    parser.add_argument("--log-dir", default=None, help="submitit logs (default RUN_DIR/slurm)")


class TrainJob:
    """Picklable job: sets up the distributed environment of this SLURM task, then trains."""

    def __init__(self, config: str, overrides):
        self.config, self.overrides = config, list(overrides)

    def __call__(self):
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from .config import load_config
        from .engine import train
        return train(load_config(self.config, self.overrides))

    def checkpoint(self, *args, **kwargs):
        import submitit
        # requeue the same job; run.resume=auto continues from latest.pt
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    cfg = load_config(args.config, args.overrides)  # validate before queueing anything
    try:
        import submitit
    except ImportError:
        raise CommandUnavailableError(
            f"submitit is not installed; `{PROG} slurm` needs it: pip install 'flexpredict-zoo[slurm]' (or pip install "
            f"submitit), or launch with torchrun / srun yourself") from None
    log_dir = Path(args.log_dir or Path(cfg.run.output_dir) / "slurm")
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"))
    params = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, name=args.job_name,
                  slurm_signal_delay_s=120)
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    extra = {k: v for k, v in (("account", args.account), ("qos", args.qos), ("constraint", args.constraint)) if v}
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(args.config, args.overrides))
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), run dir "
          f"{cfg.run.output_dir}, logs {log_dir / str(job.job_id)}")
    return 0
