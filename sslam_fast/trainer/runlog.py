"""What the user sees: a progress bar, JSON-lines metrics, TensorBoard and a final summary (rank 0).

Each logged line averages the steps since the previous one: losses, variances, LR, grad norm,
clips/s, and the split of a step's wall time into waiting for data and computing.
"""
import json
import logging
import math
import os
import time
from collections import defaultdict
from typing import Dict, Optional

from tqdm import tqdm

logger = logging.getLogger("sslam_fast.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class RunLog:
    def __init__(self, out_dir: str, start_step: int, max_steps: int, clips_per_step: int,
                 every_steps: int, tensorboard: bool, progress_bar: bool, enabled: bool):
        self.enabled = enabled
        self.every = every_steps
        self.clips_per_step = clips_per_step
        self.max_steps = max_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.window: Dict[str, float] = defaultdict(float)
        self.window_counts: Dict[str, int] = defaultdict(int)  # a metric only some steps have (the variances)
        self.totals: Dict[str, float] = defaultdict(float)
        self.last: Dict[str, float] = {}
        self.bar = self.jsonl = self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1)
        if progress_bar:
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.05)

    def message(self, text: str, warning: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(("WARNING: " if warning else "") + text)
        else:
            logger.log(logging.WARNING if warning else logging.INFO, text)

    def step(self, step: int, values: Dict[str, float], data_s: float, compute_s: float) -> None:
        """Record one optimizer update (or skipped step); write a line every ``every`` steps."""
        for key, value in {**values, "data_s": data_s, "compute_s": compute_s}.items():
            self.window[key] += value
            self.window_counts[key] += 1
        self.totals["data_s"] += data_s
        self.totals["compute_s"] += compute_s
        self.totals["steps"] += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if step % self.every == 0 or step >= self.max_steps:
            self._flush(step)

    def _flush(self, step: int) -> None:
        w = {k: v / self.window_counts[k] for k, v in self.window.items()}
        wall = w["data_s"] + w["compute_s"]
        line = {k: v for k, v in w.items() if k not in ("data_s", "compute_s")}
        line.update(step=step, clips_per_s=self.clips_per_step / wall if wall > 0 else 0.0,
                    data_ms=1000 * w["data_s"], compute_ms=1000 * w["compute_s"],
                    data_wait_frac=w["data_s"] / wall if wall > 0 else 0.0)
        self.last = line
        self.jsonl.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                     for k, v in line.items()}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in line.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{line['clips_per_s']:.1f} clips/s loss {line.get('loss', float('nan')):.4f} "
                f"lr {line.get('lr', 0.0):.2e} data {100 * line['data_wait_frac']:.0f}%", refresh=True)
        self.window.clear()
        self.window_counts.clear()

    def summary(self, step: int, bad_steps: int, collapse_steps: int, checkpoint: Optional[str], reason: str) -> str:
        elapsed = time.perf_counter() - self.started
        steps = int(self.totals["steps"])
        busy = self.totals["data_s"] + self.totals["compute_s"]
        lines = [
            f"stopped: {reason}",
            f"steps {self.start_step} -> {step} ({steps} this session) in {_fmt_duration(elapsed)}",
            f"throughput {steps * self.clips_per_step / busy if busy > 0 else 0.0:.1f} clips/s, "
            f"data wait {100 * self.totals['data_s'] / busy if busy > 0 else 0.0:.1f}% of step time",
            (f"last loss {self.last['loss']:.5f}" if "loss" in self.last else "last loss: no metrics line yet")
            + f", non-finite steps skipped {bad_steps}, "
            f"steps below the collapse thresholds {collapse_steps}",
            f"checkpoint {checkpoint or 'none'}",
        ]
        return "\n".join(lines)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
