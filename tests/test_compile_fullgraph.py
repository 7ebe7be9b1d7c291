"""The static-shape step compiles as one graph: ``torch.compile(fullgraph=True)`` raises on any
graph break (a host sync such as .item() / nonzero / bool indexing, or an op dynamo cannot trace),
for stage 1 and 2, forward and backward, over steps with new draws (new masks; in stage 2 new mix
windows, which must not recompile the step every time), with the reference ops and with the sslam_kernels custom
ops (their Triton paths, through the interpreter on CPU). The AOT-eager backend traces forward and
backward the way inductor does, without inductor's slow CPU code generation."""
import dataclasses
import functools

import pytest
import torch

import sslam_kernels
from sslam_fast.implementation import set_implementation

from helpers import fbank_batch, tiny_model

KERNEL_OPS = ("embed_mask_gather", "decoder_input_scatter", "layer_averaged_target", "masked_regression",
              "norm_gelu_residual", "bias_gelu", "add_layer_norm")


def triton_ops(ops):
    return dataclasses.replace(ops, **{n: functools.partial(getattr(sslam_kernels, n), use_triton=True)
                                       for n in KERNEL_OPS})


def run(model, step, fbank, draws, keep):
    out = step(fbank, draws, keep)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters()])
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "triton"])
def test_step_compiles_fullgraph(stage, kernels):
    torch._dynamo.reset()
    model = set_implementation(tiny_model(stage=stage, depth=2, average_top_k_layers=2, decoder_layers=1), "fused")
    if kernels:
        ops = triton_ops(model.ops)
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = ops
    from torch._dynamo.utils import counters

    fbank = fbank_batch(2, 1024 if stage == 2 else 256)
    compiled = torch.compile(model.step, fullgraph=True, backend="aot_eager")
    counters.clear()
    windows = set()
    steps = 1 if kernels else 2  # the interpreter is slow; the graph does not depend on the ops
    for seed in range(steps):  # new masks and (stage 2) new mix windows, as in training
        draws = model.draw(2, fbank.shape[2], "cpu", torch.Generator().manual_seed(seed))
        windows.add(draws.mix_windows)
        num_keep = sslam_kernels.mask_counts(draws.masks.shape[1])[1]
        keep = sslam_kernels.keep_index_from_mask(draws.masks, num_keep)
        want, want_grads = run(model, model.step, fbank, draws, keep)
        got, grads = run(model, compiled, fbank, model.step_draws(draws), keep)  # as "compiled" passes them
        for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "target_var", "pred_var"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    assert len(windows) == (steps if stage == 2 else 1)  # stage 1 has none
    assert counters["stats"]["unique_graphs"] == 1  # the windows are a tensor input: one graph for all


def test_a_host_sync_breaks_the_graph():
    """The check has teeth: the original's gathered losses (nonzero) do not compile fullgraph."""
    torch._dynamo.reset()
    model = set_implementation(tiny_model(stage=1, depth=1, average_top_k_layers=1, decoder_layers=1), "original")
    fbank = fbank_batch(1, 128)
    draws = model.draw(1, 128, "cpu", torch.Generator().manual_seed(0))
    keep = sslam_kernels.keep_index_from_mask(draws.masks, sslam_kernels.mask_counts(draws.masks.shape[1])[1])
    with pytest.raises(Exception, match="(?i)graph break|data.dependent|nonzero|dynamic"):
        torch.compile(model.step, fullgraph=True, backend="aot_eager")(fbank, draws, keep)


def test_compiled_vit_b_block_on_cpu_at_an_odd_token_count():
    """A ViT-B block (768 wide, 12 heads) compiled by inductor for the CPU at 129 tokens, in a child
    process: with the MLP's bias added after a bias-free GEMM, torch 2.13's generated code corrupted
    the heap (the process aborted; under AVX2 caps the features came out wrong). The compiled block
    must run and match the eager one."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from sslam_fast.model import Block\n"
        "torch.manual_seed(0)\n"
        "block = Block(768, 12, 4.0, 1e-6, 'sdpa').eval()\n"
        "x = torch.randn(2, 129, 768)\n"
        "compiled = torch.compile(block)\n"
        "with torch.no_grad():\n"
        "    for _ in range(2):\n"
        "        error = (compiled(x)[0] - block(x)[0]).abs().max().item()\n"
        "        assert error < 1e-4, error\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
