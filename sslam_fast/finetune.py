"""Fine-tune (or linearly evaluate) a pretrained encoder:
``deepspeed sslam_fast/finetune.py --config configs/finetune_as20k.json``.

Also runs under ``torchrun``, as a single ``python`` process and as ``sslam-fast finetune``. This
file is the launch path; the recipe and its loop are ``sslam_fast.evaluation.finetune``.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

if __package__ in (None, ""):  # run as a file (deepspeed sslam_fast/finetune.py): import the package, not its files
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sslam_fast.config import ConfigError
from sslam_fast.data import ManifestError
from sslam_fast.evaluation.finetune import load_finetune_config, run_finetune
from sslam_fast.serialization import CheckpointError
from sslam_fast.trainer.engine import init_distributed
from sslam_fast.trainer.optim import plan_batch
from sslam_fast.trainer.preflight import emulated_bf16_warning, launch_rank_and_world

logger = logging.getLogger("sslam_fast.finetune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON fine-tuning config (configs/finetune_as20k.json, finetune_as2m.json, "
                                    "finetune_esc50.json, finetune_spc2.json, linear_spass.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.init_from=SSLAM.pt --set data.dir=manifests/as20k")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world = launch_rank_and_world()
    try:
        cfg = load_finetune_config(args.config, args.set)
        plan_batch(cfg.train.global_batch, world, cfg.train.max_micro_batch)  # decided before the rendezvous
        warning = emulated_bf16_warning(cfg.train.dtype, torch.cuda.is_available())
        if warning and rank == 0:
            logger.warning(warning)
        return run_finetune(cfg, init_distributed(args.local_rank))
    except (ConfigError, CheckpointError, ManifestError, FileNotFoundError) as e:
        if rank == 0:  # every rank stops with the same status; one says why
            kind = {ConfigError: "config", CheckpointError: "checkpoint"}.get(type(e), "data")
            logger.error("%s error: %s", kind, e)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sslam_fast/finetune.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
