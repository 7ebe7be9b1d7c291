"""Linear probe: frozen-encoder features computed once (and cached), then one linear layer.

`compute_features` runs any `encoder_fn` (a callable, e.g. a frozen model's pooled embedding) over
the inputs once, without gradients, and can keep the result in a cache directory keyed by a hash
of the inputs and of the checkpoint, so a second probe on the same data and weights does not run
the encoder. `train_linear_probe` fits `features @ W.T + b` with AdamW: multi-label (BCE, reported
as mAP) or multi-class (cross entropy, reported as accuracy). It needs nothing from the trainer.
It is a quick probe, not the SPASS linear evaluation of the paper (configs/linear_spass.json runs
that): its scores are not comparable with the published ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..serialization import CheckpointError, UnsafeCheckpointError, atomic_save, safe_load
from .metrics import accuracy, mean_average_precision

logger = logging.getLogger(__name__)

TASKS = ("multilabel", "multiclass")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def module_id(module: torch.nn.Module) -> str:
    """A checkpoint id for a module: the SHA-256 of its state dict (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _batches(inputs, input_key: str, batch_size: int) -> List[torch.Tensor]:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(inputs)
        return list(tensor.split(batch_size)) if len(tensor) else []
    out = []
    for batch in inputs:
        if isinstance(batch, dict):
            if input_key not in batch:
                raise ValueError(f"batch has no {input_key!r} entry (keys {sorted(batch)})")
            batch = batch[input_key]
        out.append(torch.as_tensor(batch))
    return out


def _inputs_key(batches: List[torch.Tensor], checkpoint_id: str) -> str:
    """SHA-256 of the checkpoint id and the clips (their dtype, shape and bytes), whatever the batching."""
    digest = hashlib.sha256(f"checkpoint|{checkpoint_id}|".encode())
    for batch in batches:
        header = f"{batch.dtype}|{tuple(batch.shape[1:])}|".encode()
        for clip in batch:
            digest.update(header)
            digest.update(_tensor_bytes(clip))
    return digest.hexdigest()


def compute_features(encoder_fn: Callable[[torch.Tensor], torch.Tensor], inputs: Union[torch.Tensor, np.ndarray, Iterable],
                     cache_path: Optional[str] = None, checkpoint_id: Optional[str] = None, input_key: str = "fbank",
                     batch_size: int = 64, precision: str = "auto") -> torch.Tensor:
    """encoder_fn over all inputs -> float32 features [clips, dim] on the CPU.

    inputs: a tensor/array of clips [clips, ...] (run `batch_size` at a time), or a finite iterable
    of batches: tensors, or dicts holding the batch under `input_key` (as the project's loader
    yields with infinite=False). It is read once, into memory. encoder_fn maps a batch to [batch, dim] (a module is run in eval
    mode and left in the mode it had).

    cache_path: a directory; the features are stored there as `features-<key>.pt`, the key a
    SHA-256 of checkpoint_id and the clips' bytes, dtype and shape (not of how they are batched),
    and loaded instead of running the encoder when that file exists. checkpoint_id names the
    encoder weights (a checkpoint path and step, say); for a torch module it defaults to
    `module_id(module)`.

    precision: the inference path (``sslam_fast.released.inference``) of an encoder_fn that is a
    torch module holding an SSLAM / EAT encoder: "auto" runs it in bf16 on a CPU with native bf16
    (checked against fp32 on the first clip), "fp32" as it is. A plain callable runs as it is.
    The path is logged and enters the cache key.
    """
    batches = _batches(inputs, input_key, batch_size)
    if not batches:
        raise ValueError("no inputs")
    module = encoder_fn if isinstance(encoder_fn, torch.nn.Module) else None
    run = encoder_fn
    if module is not None:
        from ..released.inference import for_inference

        parameter = next(module.parameters(), None)
        was_training = module.training
        run = for_inference(module, parameter.device if parameter is not None else "cpu", precision)
        module.train(was_training)
        logger.info(run.path.describe())
        if checkpoint_id is None and cache_path is not None:
            checkpoint_id = module_id(module)
        if checkpoint_id is not None and run.path.precision != "fp32":
            checkpoint_id = f"{checkpoint_id}|{run.path.precision}"
    cache_file = None
    if cache_path is not None:
        if checkpoint_id is None:
            raise ValueError("checkpoint_id is needed to cache the features of an encoder_fn that is not a torch module")
        cache_file = os.path.join(cache_path, f"features-{_inputs_key(batches, checkpoint_id)[:32]}.pt")
        if os.path.isfile(cache_file):
            try:
                cached = safe_load(cache_file)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:  # a half-written or damaged entry: computed again and replaced
                logger.warning("%s; computing the features again", e)
            else:
                clips = sum(batch.shape[0] for batch in batches)
                if torch.is_tensor(cached) and cached.dtype == torch.float32 and cached.ndim == 2 and cached.shape[0] == clips:
                    logger.info("features from the cache %s", cache_file)
                    return cached
                found = f"{cached.dtype} {tuple(cached.shape)}" if torch.is_tensor(cached) else type(cached).__name__
                logger.warning("%s holds %s, not float32 features [%d, dim]; computing the features again", cache_file, found, clips)
    was_training = module is not None and module.training
    if was_training:
        module.eval()
    try:
        with torch.inference_mode():
            outputs = [run(batch) for batch in batches]
    finally:
        if was_training:
            module.train()
    for batch, out in zip(batches, outputs):
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"encoder_fn must map a batch of {batch.shape[0]} to [{batch.shape[0]}, dim], gave {tuple(out.shape)}")
    features = torch.cat([out.detach().float().cpu() for out in outputs])
    if cache_file is not None:
        atomic_save(features, cache_file)
    return features


@dataclass
class ProbeResult:
    """A trained probe. scores: its sigmoid (multilabel) or softmax (multiclass) outputs on the
    evaluation features (the training features when none were given). curve: per epoch, the mean
    training loss ("train_loss") and, with evaluation data, the metric ("eval_<metric>")."""

    task: str
    metric: str
    scores: torch.Tensor
    final_metric: Optional[float]
    curve: dict
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    config: dict = field(default_factory=dict)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return _scores(self.task, self.logits(features))


def _scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)


def _targets(targets, task: str, n: int, num_classes: Optional[int]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(targets))
    if task == "multilabel":
        if t.ndim != 2 or t.shape[0] != n:
            raise ValueError(f"multilabel targets must be [clips={n}, classes], got shape {tuple(t.shape)}")
        return t.float()
    if t.ndim == 2:
        t = t.argmax(dim=1)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"multiclass targets must be [clips={n}] class indices or one-hot, got shape {tuple(t.shape)}")
    t = t.long()
    if t.min() < 0 or (num_classes is not None and t.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes})")
    return t


def _metric(task: str, scores: torch.Tensor, targets: torch.Tensor) -> float:
    if task == "multilabel":
        return mean_average_precision(scores, targets)
    return accuracy(scores, targets)


def train_linear_probe(train_features, train_targets, eval_features=None, eval_targets=None, task: str = "multilabel",
                       epochs: int = 50, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 256,
                       seed: int = 0, num_classes: Optional[int] = None, standardise: bool = True) -> ProbeResult:
    """Fit a linear classifier on frozen features with AdamW (lr 1e-3, 50 epochs by default).

    task "multilabel": targets [clips, classes] 0/1, BCE-with-logits loss, metric mAP.
    task "multiclass": targets [clips] indices (or one-hot), cross entropy, metric accuracy.
    The layer starts at zero; features are standardised with the training mean/std when
    `standardise`; mini-batches are shuffled by a generator seeded with `seed`, so the same
    inputs and arguments give the same probe.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x = torch.as_tensor(np.asarray(train_features), dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"train_features must be [clips, dim], got shape {tuple(x.shape)}")
    y = _targets(train_targets, task, x.shape[0], num_classes)
    if task == "multilabel":
        num_classes = y.shape[1]
    elif num_classes is None:
        num_classes = int(y.max()) + 1
    has_eval = eval_features is not None
    if has_eval:
        xe = torch.as_tensor(np.asarray(eval_features), dtype=torch.float32)
        if xe.ndim != 2 or xe.shape[1] != x.shape[1]:
            raise ValueError(f"eval_features must be [clips, {x.shape[1]}], got shape {tuple(xe.shape)}")
        if eval_targets is None:
            raise ValueError("eval_features given without eval_targets")
        ye = _targets(eval_targets, task, xe.shape[0], num_classes)
    mean = x.mean(dim=0) if standardise else torch.zeros(x.shape[1])
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6) if standardise and x.shape[0] > 1 else torch.ones(x.shape[1])
    xs = (x - mean) / std

    layer = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = F.binary_cross_entropy_with_logits if task == "multilabel" else F.cross_entropy
    metric = "mAP" if task == "multilabel" else "accuracy"
    generator = torch.Generator().manual_seed(seed)
    curve = {"train_loss": []}
    if has_eval:
        curve[f"eval_{metric}"] = []
    xe_s = (xe - mean) / std if has_eval else None
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            loss = loss_fn(layer(xs[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        curve["train_loss"].append(total / x.shape[0])
        if has_eval:
            with torch.no_grad():
                curve[f"eval_{metric}"].append(_metric(task, _scores(task, layer(xe_s)), ye))
    with torch.no_grad():
        scores = _scores(task, layer(xe_s if has_eval else xs))
    return ProbeResult(task=task, metric=metric, scores=scores, final_metric=_metric(task, scores, ye) if has_eval else None,
                       curve=curve, weight=layer.weight.detach().clone(), bias=layer.bias.detach().clone(), mean=mean, std=std,
                       config={"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
                               "standardise": standardise})
