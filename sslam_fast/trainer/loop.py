"""The training loop: ``Trainer`` builds the model, the DeepSpeed engine and the loader, runs the
updates, guards them and checkpoints (launched by ``sslam_fast/train.py``).

One optimizer update ("step") sees ``train.global_batch`` clips, split over the processes and
gradient-accumulation micro steps. Every random draw of a step comes from one per-rank generator
seeded from (seed, rank) whose state is checkpointed with the data position, so a resumed run
repeats the uninterrupted one exactly. A resume on another number of processes, ZeRO stage or
precision (elastic) loads the consolidated optimizer state instead (``Trainer._load_elastic``).

Order of a step: micro batches (forward, backward) -> DeepSpeed step (clip 4.0, AdamW, LR schedule;
skipped by DeepSpeed when a gradient is not finite) -> EMA teacher from the fp32 master weights ->
metrics, guards, checkpoint. The metrics stay on the device and are read one step late (while the
next step runs), so nothing waits for the device between the optimizer and the EMA; a skipped step,
a checkpoint and the end of the run read them at once.
"""
import logging
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, to_dict
from ..implementation import set_implementation
from ..pretrainer import SSLAMPretrainer
from ..data.loader import NoClipsError, resharded_state
from ..serialization import CheckpointError, UnsafeCheckpointError, atomic_save
from .checkpoints import (OPTIMIZER_FILE, TRAIN_FORMAT, begin_save, finish_save, list_checkpoints,
                          load_engine_state, malformed_is_checkpoint_error, read_resume_state, reject,
                          remove_stale_temps, restore_rng_state, rng_state, verify_checkpoint)
from .config import TrainConfig
from .engine import MasterWeights, StudentAndDecoder, deepspeed_config, gradient_norm
from .memory import available_bytes, memory_message
from .optim import build_optimizer, build_scheduler, plan_batch
from .prefetch import Prefetcher
from .runlog import RunLog
from .session import TrainingStopped, run_session

logger = logging.getLogger("sslam_fast.train")
STATS_KEYS = ("target_var", "pred_var")  # computed on logging steps only (Trainer.stats_due)
METRIC_KEYS = ("loss", "patch_loss", "cls_loss", "srl_loss") + STATS_KEYS
IMPLEMENTATION_KEYS = ("attention",)  # may change on resume: same maths, other code path


class Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        import deepspeed

        self.cfg = cfg
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = cfg.checkpoint.dir
        # the launch's own problems were checked before the rendezvous (preflight.check_launch)
        self.plan = plan_batch(cfg.train.global_batch, self.world, cfg.train.max_micro_batch)
        resume_from, resume_files = self._choose_checkpoint() if cfg.checkpoint.resume else (None, None)

        if self.is_main:
            here = int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) if device.type == "cpu" else 1
            text, fits = memory_message(cfg, self.plan.micro_batch, here, available_bytes(device))
            logger.log(logging.INFO if fits else logging.WARNING, text)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = SSLAMPretrainer(cfg.model)
        if cfg.train.init_from and resume_from is None:
            self._init_weights(cfg.train.init_from)
        self.model.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: the decoder's convolutions pick their fastest kernels
        if cfg.train.cuda_graph:
            from torch._inductor import config as inductor_config

            inductor_config.triton.cudagraphs = True  # what mode="reduce-overhead" sets
        set_implementation(self.model, cfg.train.model_implementation)
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.dtype)
        self.trainable = StudentAndDecoder(self.model, autocast)
        optimizer = build_optimizer(self.trainable, cfg.optim, skip_non_finite=cfg.train.dtype == "fp32",
                                    fused=device.type == "cuda")
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.cosine_steps)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.trainable, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.plan))
        self.masters = MasterWeights(self.engine, list(self.trainable.parameters()))
        self.num_student_params = len(list(self.model.student.parameters()))

        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + self.rank)
        # the stage-2 mix windows are python ints: drawn on the host, they need no device sync
        self.host_generator = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + self.rank) * 2 + 1)
        self.loader = self._build_loader()
        self.data = Prefetcher(self.loader, device, depth=cfg.data.prefetch)
        self.step = 0
        self.bad_total = 0
        self.bad_in_row = 0
        self.collapse_total = 0
        self.collapsed = False
        self.saved_step = -1
        self.last_checkpoint: Optional[str] = None
        self.stop_signal: Optional[str] = None
        if resume_from is not None:
            with malformed_is_checkpoint_error(resume_from):
                self._resume(resume_from, resume_files)
        dist.barrier()
        if self.is_main:
            for name in remove_stale_temps(self.run_dir):
                logger.warning("removed %s, left by a save that did not finish", os.path.join(self.run_dir, name))
        self.log = RunLog(self.run_dir, self.step, cfg.train.max_steps, self.plan.global_batch,
                          cfg.logging.every_steps, cfg.logging.tensorboard, cfg.logging.progress_bar, self.is_main)
        self.log.message(
            f"{'resumed from ' + resume_from if resume_from else 'starting'} at step {self.step}: "
            f"{self.world} processes x {self.plan.accumulation} accumulation x {self.plan.micro_batch} clips = "
            f"{self.plan.global_batch} clips per update, ZeRO-{cfg.deepspeed.zero_stage}, "
            f"{cfg.train.execution} execution, {cfg.train.dtype}, stage {cfg.model.stage}, device {device.type}")

    # ------------------------------------------------------------------------------ building
    def _init_weights(self, path: str) -> None:
        from ..released.formats import load_pretrainer

        source = load_pretrainer(path, **to_dict(self.cfg.model))
        self.model.load_state_dict(source.state_dict())
        if self.is_main:
            logger.info("initialised student, decoder and teacher from %s (fresh optimizer and schedule)", path)
            given, d = source.input_settings, self.cfg.data
            if (given.norm_mean, given.norm_std) != (d.norm_mean, d.norm_std):
                logger.warning("%s was trained on fbanks normalised with mean %.4g std %.4g (%s); this run uses "
                               "data.norm_mean=%.4g data.norm_std=%.4g", path, given.norm_mean, given.norm_std,
                               given.origin, d.norm_mean, d.norm_std)

    def _build_loader(self):
        from ..data.loader import build_loader
        from ..data.tools import make_demo_dataset

        d = self.cfg.data
        manifest = d.manifest
        if d.demo_clips > 0:
            manifest = os.path.join(self.run_dir, "demo_data", "train.tsv")
            if self.is_main and not os.path.exists(manifest):
                seconds = (400 + 160 * (d.target_length - 1)) / 16000  # exactly target_length frames
                make_demo_dataset(os.path.dirname(manifest), d.demo_clips, seconds=seconds, seed=self.cfg.train.seed)
            dist.barrier()
        return build_loader(manifest, self.plan.micro_batch, rank=self.rank, world_size=self.world,
                            seed=self.cfg.train.seed, target_length=d.target_length, norm_mean=d.norm_mean,
                            norm_std=d.norm_std, backend=d.backend, num_workers=d.num_workers,
                            device=self.device if self.device.type == "cuda" else None,
                            max_skips_in_a_row=d.max_skips_in_a_row)

    # ------------------------------------------------------------------------------ one update
    def stats_due(self, step: int) -> bool:
        """Whether update ``step`` computes target_var and pred_var: on the steps that write a
        metrics line (every ``logging.every_steps`` and the last), where they are logged and the
        collapse guard reads them; the other steps skip their passes over the targets."""
        return step % self.cfg.logging.every_steps == 0 or step >= self.cfg.train.max_steps

    def train_step(self) -> Dict[str, Any]:
        """Forward/backward over the micro batches, the optimizer step and the teacher's EMA.

        Returns the step's record for ``read_metrics``: the metric sums over ranks still on the device,
        the gradient norm before clipping (DeepSpeed's where it keeps one, else computed here at the
        accumulation boundary, on the device), and the host values (``skipped`` is 1 when DeepSpeed
        skipped the update for a non-finite gradient: the weights, the schedule and the teacher stay
        unchanged).
        """
        sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=self.device)
        lr = self.scheduler.get_last_lr()[0]  # the LR this update uses
        stats = self.stats_due(self.step + 1)
        data_s, norm = 0.0, None
        for _ in range(self.plan.accumulation):
            t = time.perf_counter()
            fbank = self.data.next()["fbank"]
            data_s += time.perf_counter() - t
            if self.cfg.train.cuda_graph:
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
            out = self.engine(fbank, generator=self.generator, host_generator=self.host_generator, stats=stats)
            self.engine.backward(out["loss"])
            if self.engine.is_gradient_accumulation_boundary():
                norm = gradient_norm(self.trainable.parameters())
            self.engine.step()
            ss = out["sample_size"].double()
            values = [out["loss"].detach().double(), out["patch_loss"].double() / ss, out["cls_loss"].double() / ss,
                      out["srl_loss"].double() / ss]
            if stats:
                values += [out["target_var"].detach().double(), out["pred_var"].detach().double()]
            sums[:len(values)] += torch.stack(values)
        sums[-1] = float(self.stop_signal is not None)
        dist.all_reduce(sums)
        record = {"sums": sums, "skipped": float(not self.engine.was_step_applied()), "lr": lr, "data_s": data_s,
                  "stats": stats}
        if not record["skipped"]:
            self.step += 1
            source = self.masters.gather() if self.cfg.train.ema_from == "master" else self.model.student.parameters()
            record["ema_decay"] = self.model.update_teacher(self.step, list(source)[:self.num_student_params])
        reported = self.engine.get_global_grad_norm()
        record["grad_norm"] = reported if reported is not None else norm
        record["step"] = self.step
        return record

    def read_metrics(self, record: Dict[str, Any]) -> Dict[str, float]:
        """A step's metrics on the host, averaged over ranks (one device-to-host copy)."""
        totals = record["sums"].tolist()
        keys = METRIC_KEYS if record["stats"] else METRIC_KEYS[:-len(STATS_KEYS)]
        metrics = {key: total / (self.world * self.plan.accumulation) for key, total in zip(keys, totals)}
        metrics["stop"] = float(totals[-1] > 0)
        metrics.update({k: record[k] for k in ("skipped", "lr", "ema_decay") if k in record})
        grad_norm = record["grad_norm"]
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return metrics

    # ------------------------------------------------------------------------------ guards
    def check_guards(self, m: Dict[str, float], step: int) -> None:
        t = self.cfg.train
        if m["skipped"] or not math.isfinite(m["loss"]):
            self.bad_total += 1
            self.bad_in_row += 1
            self.log.message(f"step {step + 1}: non-finite loss or gradient (loss {m['loss']}), update skipped "
                             f"({self.bad_in_row} in a row, {self.bad_total} in total)", warning=True)
            if self.bad_in_row >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_row} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}) at step "
                    f"{step}: the run is diverging. Last checkpoint: {self.last_checkpoint or 'none'}. Lower "
                    f"optim.lr, check the data (norm_mean/norm_std), or resume from an earlier checkpoint.")
            return
        self.bad_in_row = 0
        if "target_var" not in m:  # the variances are computed on logging steps (stats_due)
            return
        collapsed = step > t.collapse_after and (m["target_var"] < t.min_target_var or m["pred_var"] < t.min_pred_var)
        if collapsed:
            self.collapse_total += 1
            if not self.collapsed:
                self.log.message(
                    f"step {step}: representation collapse? target_var {m['target_var']:.4g} "
                    f"(min {t.min_target_var}), pred_var {m['pred_var']:.4g} (min {t.min_pred_var})", warning=True)
            if t.stop_on_collapse:
                raise TrainingStopped(f"collapse at step {step}: target_var {m['target_var']:.4g}, "
                                      f"pred_var {m['pred_var']:.4g} (train.stop_on_collapse)")
        elif self.collapsed:
            self.log.message(f"step {step}: variances back above the collapse thresholds")
        self.collapsed = collapsed

    # ------------------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """All ranks write into a temp directory; rank 0 publishes it by renaming."""
        tmp = begin_save(self.run_dir, self.step, self.is_main)
        self.engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="engine", save_latest=False)
        optimizer = self.masters.full_state()
        data = [None] * self.world
        dist.all_gather_object(data, self.data.state_dict())
        atomic_save({"rng": rng_state(self.generator), "host_rng": self.host_generator.get_state(),
                     "data": self.data.state_dict()},
                    os.path.join(tmp, f"rank_{self.rank}.pt"))
        if self.is_main:
            names = [name for name, _ in self.trainable.named_parameters()]
            state = self.model.state_dict()
            for name, master in zip(names, optimizer["master"]):
                state[name] = master.float()
            atomic_save({
                "format": TRAIN_FORMAT,
                "version": 2,
                "config": to_dict(self.cfg),
                "model": {k: v.detach().cpu() for k, v in state.items()},
                "step": self.step,
                "world_size": self.world,
                "zero_stage": self.cfg.deepspeed.zero_stage,
                "data": data,
                "counters": {"bad_total": self.bad_total, "collapse_total": self.collapse_total},
            }, os.path.join(tmp, "train.pt"))
            atomic_save({"names": names, "scheduler": self.scheduler.state_dict(),
                         **{k: [t.cpu() for t in v] if isinstance(v, list) else v for k, v in optimizer.items()}},
                        os.path.join(tmp, OPTIMIZER_FILE))
        self.last_checkpoint = finish_save(tmp, self.run_dir, self.step, self.cfg.checkpoint.keep_last, self.is_main)
        self.saved_step = self.step
        return self.last_checkpoint

    def _choose_checkpoint(self):
        """The newest checkpoint that verifies against its checksums and loads on every rank, with
        its files; those that fail are reported and renamed aside. (None, None) when there is none.

        A refused (unsafe) file stops the run rather than falling back: someone wrote it there.
        """
        rejected = []
        for path in reversed(list_checkpoints(self.run_dir)):
            reason = [verify_checkpoint(path) if self.is_main else None]
            dist.broadcast_object_list(reason, src=0)
            reason, files, outcome = reason[0], None, None
            if reason is not None:
                outcome = ("bad", reason)
            else:
                try:
                    files = read_resume_state(path, self.rank, self.world, self.cfg.deepspeed.zero_stage,
                                              self.cfg.train.precision)
                except UnsafeCheckpointError as e:
                    outcome = ("unsafe", str(e))
                except CheckpointError as e:
                    outcome = ("bad", str(e))
            outcomes = [None] * self.world
            dist.all_gather_object(outcomes, outcome)
            unsafe = [text for kind, text in filter(None, outcomes) if kind == "unsafe"]
            if unsafe:
                raise UnsafeCheckpointError(unsafe[0])
            failures = [text for _, text in filter(None, outcomes)]
            if not failures:
                if self.is_main:
                    for bad, why in rejected:
                        logger.warning("skipped checkpoint %s: %s; moved to %s, resuming from %s",
                                       bad, why, reject(bad), path)
                dist.barrier()
                return path, files
            reason = failures[0]
            rejected.append((path, reason))
        if rejected:
            raise CheckpointError(f"checkpoint.dir={self.run_dir}: no checkpoint to resume from passes "
                                  "verification: " + "; ".join(f"{p}: {r}" for p, r in rejected))
        return None, None

    def _resume(self, path: str, files) -> None:
        state, own = files["train"], files["rank"]
        saved, mine = state["config"]["model"], to_dict(self.cfg.model)
        changed = sorted(k for k in mine if k in saved and saved[k] != mine[k] and k not in IMPLEMENTATION_KEYS)
        if changed:
            raise ConfigError(f"{path}: model.{changed[0]} is {saved[changed[0]]!r} in the checkpoint and "
                              f"{mine[changed[0]]!r} now; resume with the checkpoint's model section")
        batch = state["config"]["train"]["global_batch"]
        if batch != self.cfg.train.global_batch:
            raise ConfigError(f"{path}: train.global_batch is {batch} in the checkpoint and "
                              f"{self.cfg.train.global_batch} now; the schedules and the data position count in it")
        if files["elastic"]:
            self._load_elastic(path, state, own, files["optimizer"])
        else:
            load_engine_state(self.engine, path, files["listing"])
            self._restore_rank_state(own)
        teacher = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
        self.model.teacher.load_state_dict(teacher)
        self.step = self.saved_step = state["step"]
        self.bad_total = state["counters"]["bad_total"]
        self.collapse_total = state["counters"]["collapse_total"]
        self.last_checkpoint = path

    def _restore_rank_state(self, own) -> None:
        """This rank's random streams and data position, as ``rank_<r>.pt`` holds them."""
        restore_rng_state(own["rng"], self.generator)
        if "host_rng" in own:  # written since the mix windows come from the host generator
            self.host_generator.set_state(own["host_rng"])
        self.data.load_state_dict(own["data"])

    def _load_elastic(self, path: str, state, own, optimizer) -> None:
        """Resume a checkpoint of another world size, ZeRO stage or precision from its consolidated
        optimizer state: weights, Adam moments, step and LR schedule exact; the data position from
        the entries all old ranks consumed; new per-rank random streams (unless the world size is
        the same) seeded from (seed, rank, step)."""
        names = [name for name, _ in self.trainable.named_parameters()]
        if optimizer["names"] != names:
            raise CheckpointError(f"{os.path.join(path, OPTIMIZER_FILE)}: its parameters are not this model's")
        self.masters.load_full_state(optimizer)
        self.scheduler.load_state_dict(optimizer["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.engine.global_steps = state["step"]
        self.engine.global_samples = state["step"] * self.plan.global_batch
        if own is not None:
            self._restore_rank_state(own)
        else:
            seed = int(np.random.SeedSequence([self.cfg.train.seed, self.rank, state["step"]]).generate_state(1)[0])
            self.generator.manual_seed(seed)
            self.host_generator.manual_seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            self.data.load_state_dict(resharded_state(state["data"], self.rank, self.world))
        if self.is_main:
            logger.info("elastic resume from %s: written by %d processes with ZeRO-%s, %s; now %d with ZeRO-%d, %s",
                        path, state["world_size"], state.get("zero_stage", "?"), state["config"]["train"]["precision"],
                        self.world, self.cfg.deepspeed.zero_stage, self.cfg.train.precision)

    # ------------------------------------------------------------------------------ the run
    def report(self, records: List[Dict[str, Any]]) -> bool:
        """Read, guard and log ``records`` in order; True when a rank asked to stop."""
        stop = False
        for record in records:
            m = self.read_metrics(record)
            stop = bool(m.pop("stop")) or stop
            self.check_guards(m, record["step"])
            m.update(bad_steps=self.bad_total, collapse_steps=self.collapse_total)
            self.log.step(record["step"], m, record["data_s"], record["compute_s"])
        return stop

    def run(self) -> int:
        cfg = self.cfg
        reason, status = f"reached train.max_steps={cfg.train.max_steps}", 0
        try:
            with run_session(self):
                pending: List[Dict[str, Any]] = []
                while self.step < cfg.train.max_steps:
                    t = time.perf_counter()
                    record = self.train_step()
                    record["compute_s"] = time.perf_counter() - t - record["data_s"]
                    pending.append(record)
                    # the previous step is read while this one runs; a skipped one (DeepSpeed has read the
                    # gradients' norm already) at once. One process stops on its own flag at once; ranks
                    # agree on the flag of the step read.
                    ready = len(pending) if record["skipped"] else len(pending) - 1
                    stop = self.report(pending[:ready])
                    del pending[:ready]
                    stop = stop or (self.world == 1 and self.stop_signal is not None)
                    save = self.step % cfg.checkpoint.every_steps == 0 and self.step != self.saved_step
                    if stop or save:
                        stop = self.report(pending) or stop
                        pending.clear()
                    if stop:
                        reason = f"{self.stop_signal or 'a signal to another rank'} received at step {self.step}"
                        break
                    if save:
                        self.save()
                self.report(pending)
        except (TrainingStopped, NoClipsError) as e:  # NoClipsError: the data gives no clips
            reason, status = str(e), 2
            logger.error(reason)
        if status == 0 and self.step != self.saved_step:
            self.save()
        self.log.message(self.log.summary(self.step, self.bad_total, self.collapse_total, self.last_checkpoint, reason))
        self.log.close()
        return status
