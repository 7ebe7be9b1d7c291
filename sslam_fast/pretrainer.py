"""One SSLAM / EAT pretraining step as a pure function of (weights, batch, draws): docs/method.md §4-7."""
import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

import sslam_kernels

from .config import SSLAMConfig
from .implementation import FUSED
from .masking import visible_index
from .mixing import check_windows, draw_mix_windows, partial_mixture
from .model import CNNDecoder, Encoder, as_fbank_batch
from .objectives import dense_losses, gathered_losses, source_retention_target
from .teacher import ema_decay_at, make_teacher


@dataclass
class Draws:
    """Every random draw of one step; a missing field is drawn internally.

    masks: BoolTensor[V, P], True = masked. V views are ordered [clip0 x clone, clip1 x clone,
        ..., then (stage 2) the mixtures in the same order]; P patches, time-major.
    mix_windows: (w1, w2), the two unmixed windows in frames (stage 2); ``SSLAMPretrainer.step``
        also takes them as an int64 [2] tensor (``SSLAMPretrainer.step_draws``).
    decoder_noise: Tensor[V, P, D], the decoder's input at masked positions (values at visible
        positions are ignored).
    """

    masks: Optional[torch.Tensor] = None
    mix_windows: Optional[Tuple[int, int]] = None
    decoder_noise: Optional[torch.Tensor] = None


class SSLAMPretrainer(nn.Module):
    """Student encoder, CNN decoder and EMA teacher; ``forward(fbank)`` returns the step's losses.

    Call ``update_teacher(step)`` after each optimizer step (step = updates done so far).
    """

    def __init__(self, cfg: SSLAMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.student = Encoder(cfg)
        self.decoder = CNNDecoder(cfg)
        self.teacher = make_teacher(self.student)
        self.ops = FUSED  # how the ops run: set from outside with implementation.set_implementation
        self._ema = None  # (key, FusedEMA) of the last update_teacher source
        self._shadow = None  # (key, low-precision copy of the teacher): not a submodule, not in checkpoints

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def __getstate__(self):
        """A copy (or pickle) drops the compiled ``step`` of the "compiled" implementation, which
        is bound to this instance, as nn.Module drops its own compiled call."""
        state = super().__getstate__()
        state.pop("step", None)
        return state

    # ----------------------------------------------------------------------- teacher
    def ema_decay(self, step: int) -> float:
        c = self.cfg
        return ema_decay_at(step, c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step)

    def update_teacher(self, step: int, student_params=None) -> float:
        """EMA step with the decay of ``step``; ``student_params`` defaults to the student's own
        parameters (pass fp32 master copies where the optimizer keeps them). Returns the decay."""
        decay = self.ema_decay(step)
        if decay < 1:
            source = [p.detach() for p in (self.student.parameters() if student_params is None else student_params)]
            teacher = list(self.teacher.parameters())
            shadow = self._live_shadow()
            shadow_params = None if shadow is None else list(shadow.parameters())
            key = (self.ops.ema_backend, tuple(p.data_ptr() for p in source + teacher + (shadow_params or [])))
            if self._ema is None or self._ema[0] != key:  # built once while the tensors stay where they are
                self._ema = (key, sslam_kernels.FusedEMA(source, teacher, backend=self.ops.ema_backend,
                                                         shadow=shadow_params))
            self._ema[1].update(decay)
            if shadow is not None:  # rewritten by the same update: still current
                self._shadow = ((shadow_params[0].dtype, self._teacher_version()), shadow)
        return decay

    def _teacher_version(self):
        return tuple((p.data_ptr(), p._version) for p in self.teacher.parameters())

    def _live_shadow(self) -> Optional[nn.Module]:
        """The shadow if it is current (the teacher unchanged since it was written), else None."""
        if self._shadow is None or self._shadow[0][1] != self._teacher_version():
            return None
        return self._shadow[1]

    def forward_teacher(self) -> nn.Module:
        """The module the teacher passes run. Under a bf16 / fp16 autocast (with
        ``ops.teacher_shadow``): a copy of the teacher with its parameters in that dtype (the fp32
        positions kept), which the EMA update rewrites in the same pass, so no pass casts the fp32
        teacher; rebuilt from the teacher whenever the teacher changed otherwise (loading, a
        manual edit). The values are those autocast's casts give. Else the fp32 teacher itself."""
        device_type = self.teacher.cls_token.device.type
        if not (self.ops.teacher_shadow and torch.is_autocast_enabled(device_type)):
            return self.teacher
        dtype = torch.get_autocast_dtype(device_type)
        if dtype not in (torch.bfloat16, torch.float16):
            return self.teacher
        shadow = self._live_shadow()
        if shadow is None or shadow.cls_token.dtype != dtype:
            shadow = copy.deepcopy(self.teacher)
            for p in shadow.parameters():
                p.data = p.data.to(dtype)
            self._shadow = ((dtype, self._teacher_version()), shadow)
        for mine, theirs in zip(shadow.modules(), self.teacher.modules()):  # follow the implementation
            if hasattr(theirs, "ops"):
                mine.ops = theirs.ops
        return shadow

    # ----------------------------------------------------------------------- draws
    def draw(self, batch_size: int, num_frames: int, device, generator: Optional[torch.Generator] = None,
             draws: Optional[Draws] = None, host_generator: Optional[torch.Generator] = None) -> Draws:
        """Fill the missing fields of ``draws`` for a batch of ``batch_size`` clips.

        Masks and decoder noise come from ``generator`` (on ``device`` or the CPU); the stage-2 mix
        windows are python ints, drawn from ``host_generator`` (a CPU generator: no host sync) or,
        without one, from ``generator`` (a host sync when it is on a GPU). The noise is drawn in
        the autocast dtype when autocast is on (its values at visible positions are never read).
        """
        c = self.cfg
        draws = draws or Draws()
        grid = (num_frames // c.patch_size, c.freq_patches)
        inputs = batch_size * (2 if c.stage == 2 else 1)
        views, patches = inputs * c.clone_batch, grid[0] * grid[1]
        masks = draws.masks
        if masks is None:
            masks = self.ops.inverse_block_mask(batch_size * c.clone_batch, grid, c.mask_prob, c.mask_length, c.mask_prob_adjust,
                               generator=generator, device=device)
            if c.stage == 2:
                masks = torch.cat([masks, masks])  # each mixture reuses its base clip's masks
        elif masks.shape != (views, patches) or masks.dtype != torch.bool:
            raise ValueError(f"draws.masks must be bool [{views}, {patches}], got {masks.dtype} {list(masks.shape)}")
        windows = draws.mix_windows
        if c.stage == 2:
            windows = check_windows(
                windows if windows is not None
                else draw_mix_windows(host_generator or generator, num_frames, c.mix_window, c.mix_w1_max,
                                      c.mix_w2_max, c.mix_step),
                num_frames, c.mix_window, c.mix_step)
        noise = draws.decoder_noise
        if noise is None:
            device_type = torch.device(device).type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
            noise = torch.empty(views, patches, c.embed_dim, device=device, dtype=dtype).normal_(
                0, c.mask_noise_std, generator=generator)
        if noise.shape != (views, patches, c.embed_dim):
            raise ValueError(f"draws.decoder_noise must be [{views}, {patches}, {c.embed_dim}], got {list(noise.shape)}")
        return Draws(masks=masks.to(device), mix_windows=windows, decoder_noise=noise.to(device))

    # ----------------------------------------------------------------------- step
    def forward(self, fbank: torch.Tensor, draws: Optional[Draws] = None,
                mixture: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None,
                host_generator: Optional[torch.Generator] = None, stats: bool = True) -> Dict[str, torch.Tensor]:
        """fbank: [B, 1, T, 128] normalised log-mel. ``mixture`` (stage 2) may come precomputed from
        the data pipeline for ``draws.mix_windows``. Returns loss (= (patch_loss + cls_loss +
        srl_loss) / sample_size), the three summed terms, sample_size, target_var and pred_var
        (only with ``stats``, for the static-shape implementations; "original" computes them every
        step, as the original code does), and the draws used. The step: draw (``draw``; ``host_generator``: a CPU generator for the mix
        windows), then ``step``: predict (student and decoder), targets (teacher), losses."""
        c = self.cfg
        fbank = as_fbank_batch(fbank, c.num_mel_bins, c.patch_size, self.student.max_frames)
        B, _, T, _ = fbank.shape
        if c.stage == 2 and mixture is not None and (draws is None or draws.mix_windows is None):
            raise ValueError("a precomputed mixture needs the draws.mix_windows it was made with")
        given_masks = draws is not None and draws.masks is not None
        draws = self.draw(B, T, fbank.device, generator, draws, host_generator)
        if given_masks:
            keep = visible_index(draws.masks)  # checks that every view keeps the same number of patches
        else:
            num_keep = sslam_kernels.mask_counts(draws.masks.shape[1], c.mask_prob, c.mask_length, c.mask_prob_adjust)[1]
            keep = sslam_kernels.keep_index_from_mask(draws.masks, num_keep)
        return {**self.step(fbank, draws, keep, mixture, self.forward_teacher(), stats), "draws": draws}

    def step_draws(self, draws: Draws) -> Draws:
        """``draws`` as a compiled ``step`` takes them (the "compiled" implementation passes them
        so): with the static-shape implementations the stage-2 mix windows become an int64 [2]
        tensor on the masks' device (a pinned, asynchronous copy: no host sync). Python ints would
        enter the compiled step as constants, or once they change as symbolic ints: one recompile
        and, under CUDA graphs, one recording per pair of windows. Eager steps keep the ints."""
        if draws.mix_windows is None or not self.ops.static_shapes or isinstance(draws.mix_windows, torch.Tensor):
            return draws
        windows = torch.tensor(draws.mix_windows, dtype=torch.int64)
        if draws.masks.is_cuda:
            windows = windows.pin_memory()
        return dataclasses.replace(draws, mix_windows=windows.to(draws.masks.device, non_blocking=True))

    def step(self, fbank: torch.Tensor, draws: Draws, keep: torch.Tensor,
             mixture: Optional[torch.Tensor] = None, teacher: Optional[nn.Module] = None,
             stats: bool = True) -> Dict[str, torch.Tensor]:
        """The step on drawn ``draws`` whose views keep the patches ``keep`` [V, K] (ascending):
        predict, teacher targets (run by ``teacher``, default ``self.teacher``; ``forward``
        passes ``forward_teacher()``), losses. With the static-shape implementations it has no
        host sync and no data-dependent shape (it compiles with ``torch.compile(fullgraph=True)``;
        compiled, give it ``step_draws(draws)``, whose mix windows are a tensor, so new windows
        reuse the graph)."""
        c = self.cfg
        B, _, T, _ = fbank.shape
        grid = (T // c.patch_size, c.freq_patches)
        if c.stage == 2:
            if mixture is None:
                mixture = partial_mixture(fbank, draws.mix_windows, c.mix_window)
            inputs = torch.cat([fbank, mixture.to(fbank.dtype)])  # [B originals, B mixtures]
        else:
            inputs = fbank
        pred, student_cls = self.predict(inputs, draws, keep, grid)
        targets = self.teacher_targets(inputs, B, draws.mix_windows, grid, teacher)
        return self.losses(pred, student_cls, targets, draws.masks, grid[0] * grid[1] - keep.shape[1], stats)

    def predict(self, inputs: torch.Tensor, draws: Draws, keep: torch.Tensor,
                grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The student on the visible patches ``keep`` of every view, then the decoder on the visible
        outputs put back in place among noise: predictions [V, P, D] and the student CLS [V, D]."""
        x = self.student(inputs, keep_index=keep, clone=self.cfg.clone_batch)
        dec_in = self.ops.decoder_input_scatter(x[:, 1:], keep, draws.decoder_noise)
        return self.decoder(dec_in, grid), x[:, 0]

    @torch.no_grad()
    def teacher_targets(self, inputs: torch.Tensor, batch_size: int, windows, grid,
                        teacher: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """Teacher on the full inputs: patch targets [N, P, D] (top-K layer average) and utterance
        targets [N, D] (stage 1: the same average; stage 2: the last layer). Stage 2 adds the Source
        Retention target [B, P, D] of the B mixtures (``source_retention_target``). ``teacher``:
        the module that runs the passes (default: the teacher; see ``forward_teacher``)."""
        c = self.cfg
        teacher = self.teacher if teacher is None else teacher
        target = functools.partial(self.ops.layer_averaged_target, eps_instance=c.instance_norm_eps,
                                   eps_layer=c.target_norm_eps)
        tokens = teacher.tokens(inputs)
        _, layers = teacher.run_blocks(tokens, collect=True)
        patch = target(layers[-c.average_top_k_layers:])
        if c.stage == 1:
            return {"patch": patch, "cls": patch.mean(dim=1)}
        srl = source_retention_target(teacher, tokens[:batch_size], patch[:batch_size], windows, grid, c, target,
                                      self.ops.static_shapes)
        return {"patch": patch, "cls": target(layers[-1:]).mean(dim=1), "srl": srl}

    def losses(self, pred: torch.Tensor, student_cls: torch.Tensor, targets: Dict[str, torch.Tensor],
               masks: torch.Tensor, num_masked: Optional[int] = None, stats: bool = True) -> Dict[str, torch.Tensor]:
        """Patch, CLS and (stage 2) Source Retention losses at the masked positions, each summed;
        view v's targets are those of its input, v // clone_batch (docs/method.md §6-7).
        ``num_masked``: the patches every view masks (read from ``masks``, a host sync, if None).
        The static-shape implementations compute them densely (``objectives.dense_losses``; the
        variances only with ``stats``), "original" by gathering the masked rows
        (``objectives.gathered_losses``, variances always)."""
        if not self.ops.static_shapes:
            return gathered_losses(pred, student_cls, targets, masks, self.cfg)
        if num_masked is None:
            num_masked = int(masks[0].sum())
        return dense_losses(pred, student_cls, targets, masks, self.cfg, num_masked, self.ops.masked_regression, stats)

def step_flops_per_clip(cfg: SSLAMConfig, num_frames: int = 1024) -> float:
    """Training FLOPs per clip of one step (docs/method.md §10): teacher forward(s), plus student and decoder
    forward + backward (3x forward) for each view. Matmul FLOPs only (2 per multiply-add)."""
    D, depth = cfg.embed_dim, cfg.depth
    patches = num_frames // cfg.patch_size * cfg.freq_patches
    visible = sslam_kernels.mask_counts(patches, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust)[1] + 1

    def encoder(tokens: int) -> float:
        per_token = 2 * D * D * (4 + 2 * cfg.mlp_ratio) + 4 * tokens * D
        return depth * tokens * per_token

    conv = 2 * (D // cfg.decoder_groups) * cfg.decoder_kernel**2 * D * patches * cfg.decoder_layers
    decoder = conv + 2 * D * D * patches
    views = cfg.clone_batch
    teacher = encoder(patches + 1)
    if cfg.stage == 2:
        views *= 2
        mixed = (num_frames - 2 * cfg.mix_window) // cfg.patch_size * cfg.freq_patches
        teacher = 2 * teacher + encoder(mixed + 1)
    return teacher + views * 3 * (encoder(visible) + decoder)
