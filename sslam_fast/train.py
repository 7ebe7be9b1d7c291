"""Pretrain SSLAM / EAT: ``deepspeed sslam_fast/train.py --config configs/as2m.json``.

Also runs under ``torchrun`` and as a single ``python`` process. This file is the launch path; the
loop is ``sslam_fast.trainer.loop.Trainer``, the config ``sslam_fast.trainer.config``.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

if __package__ in (None, ""):  # run as a file (deepspeed sslam_fast/train.py): import the package, not its files
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sslam_fast.config import ConfigError
from sslam_fast.serialization import CheckpointError
from sslam_fast.trainer.config import load_config
from sslam_fast.trainer.engine import init_distributed
from sslam_fast.trainer.loop import Trainer
from sslam_fast.trainer.preflight import check_launch, emulated_bf16_warning, launch_rank_and_world

logger = logging.getLogger("sslam_fast.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON train config (configs/as2m.json, as2m_sslam.json, demo.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=1000 --set checkpoint.dir=runs/x")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world = launch_rank_and_world()
    try:
        cfg = load_config(args.config, args.set)
        check_launch(cfg, world)  # every rank decides alone, before the rendezvous
        warning = emulated_bf16_warning(cfg.train.dtype, torch.cuda.is_available())
        if warning and rank == 0:
            logger.warning(warning)
        trainer = Trainer(cfg, init_distributed(args.local_rank))
    except (ConfigError, CheckpointError) as e:
        if rank == 0:  # every rank stops with the same status; one says why
            logger.error("%s error: %s", "config" if isinstance(e, ConfigError) else "checkpoint", e)
        return 1
    return trainer.run()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sslam_fast/train.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
