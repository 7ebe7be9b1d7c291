"""The checkout as users run it: its top-level folders never shadow another distribution's import
name, and every sslam_kernels op (and FusedEMA) works on its PyTorch path without triton."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = sorted(d for d in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, d)) and d.isidentifier())


def _run_from_checkout(code: str, pythonpath: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, as a user of a checkout starts Python:
    the root is first on sys.path, then PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_only_sslam_fast_is_a_package_at_the_top_level():
    assert {"kernels", "sslam_fast", "tests", "benchmarks", "configs", "docs"} <= set(TOP_LEVEL)
    packages = [d for d in TOP_LEVEL if os.path.exists(os.path.join(REPO, d, "__init__.py"))]
    assert packages == ["sslam_fast"], packages
    assert os.path.isfile(os.path.join(REPO, "kernels", "sslam_kernels", "__init__.py"))


def test_top_level_folders_do_not_shadow_other_distributions(tmp_path):
    """A distribution installed under each top-level folder's name (kernels is Hugging Face's, which
    transformers 5 imports) is the one imported from the repository root."""
    names = [d for d in TOP_LEVEL if d != "sslam_fast"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'the other {name}'\n")
    done = _run_from_checkout(f"""
        import importlib, sys
        assert sys.path[0] == '', sys.path[:2]  # the checkout's root comes first
        for name in {names!r}:
            print(name, importlib.import_module(name).WHO)
        """, pythonpath=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:-1] == [f"{name} the other {name}" for name in names]


@pytest.mark.skipif(not (_installed("transformers") and _installed("kernels")),
                    reason="needs transformers and Hugging Face's kernels distribution (the dev extra brings both)")
def test_transformers_ast_model_from_the_checkout_with_hf_kernels_installed():
    done = _run_from_checkout("""
        import os
        import kernels
        import transformers
        from transformers import ASTConfig
        config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           num_mel_bins=32, max_length=64)
        model = transformers.ASTModel(config)
        print(os.path.realpath(kernels.__file__))
        print(type(model).__name__)
        """)
    assert done.returncode == 0, done.stderr[-3000:]
    where, name = done.stdout.split("\n")[-3:-1]
    assert name == "ASTModel"
    assert not where.startswith(os.path.realpath(REPO) + os.sep), where  # Hugging Face's kernels, not ours
    assert importlib.util.find_spec("kernels").origin == where  # and so inside this test session


NO_TRITON = """
import sys

class _NoTriton:  # triton is not installed, as far as this process can tell
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (hidden by the test)")
        return None

sys.meta_path.insert(0, _NoTriton())
import torch
import torch.nn as nn
import sslam_kernels as K
from sslam_kernels._triton import triton_available
assert not triton_available and "triton" not in sys.modules

gen = torch.Generator().manual_seed(0)
rand = lambda *shape, dtype=torch.float32, grad=False: torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)


def check(name, out, ref, tol=0.0):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and torch.isfinite(o).all(), name
        assert (o.float() - r.float()).abs().max().item() <= tol, name
    print("ok", name)


def grads(fn, *xs):
    ys = fn(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)
    sum((y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum() for y in ys if y.requires_grad).backward()
    g = tuple(x.grad.clone() for x in xs if x.requires_grad)
    for x in xs:
        if x.requires_grad:
            x.grad = None
    return ys, g


# FusedEMA: fp32 / bf16 / fp16 students into an fp32 teacher, with and without a bf16 shadow
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    student = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5)).to(dtype)
    teacher = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5))
    shadow = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5)).to(torch.bfloat16)
    before = [t.detach().clone() for t in teacher.parameters()]
    K.FusedEMA(student, teacher, shadow=shadow).update(0.9)
    for t, t0, s, sh in zip(teacher.parameters(), before, student.parameters(), shadow.parameters()):
        expect = t0 * 0.9 + s.detach().float() * 0.1
        assert torch.allclose(t.detach(), expect, atol=1e-6), dtype
        assert torch.equal(sh.detach(), t.detach().to(torch.bfloat16)), dtype
    print("ok FusedEMA", dtype)
try:
    K.FusedEMA(nn.Linear(3, 2).double(), nn.Linear(3, 2)).update(0.9)
except TypeError as e:
    assert str(e) == "EMA student must be torch.float32, torch.bfloat16 or torch.float16, got torch.float64", e
    print("ok FusedEMA refuses float64:", e)
else:
    raise AssertionError("a float64 student was accepted")
try:
    K.FusedEMA(nn.Linear(3, 2), nn.Linear(3, 2), backend="triton").update(0.9)
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
    print("ok FusedEMA backend=triton says:", e)
else:
    raise AssertionError("backend='triton' ran without triton")

# every op, forward and backward, on odd shapes against its reference
N, P, D, clone, Kp = 2, 7, 5, 3, 4
keep = torch.stack([torch.randperm(P, generator=gen)[:Kp] for _ in range(N * clone)])
patches, pos, cls = rand(N, P, D, grad=True), rand(P, D), rand(1, D, grad=True)
out, g = grads(lambda p, c: K.embed_mask_gather(p, pos, c, keep, clone), patches, cls)
ref, gr = grads(lambda p, c: K.embed_mask_gather_reference(p, pos, c, keep, clone), patches, cls)
check("embed_mask_gather", out + g, ref + gr)

V = N * clone
restore = torch.stack([torch.randperm(P, generator=gen) for _ in range(V)])
x, tokens = rand(V, 1 + Kp, D, grad=True), rand(V, P - Kp, D, grad=True)
out, g = grads(lambda a, b: K.decoder_input_gather(a, restore, b, 1), x, tokens)
ref, gr = grads(lambda a, b: K.decoder_input_gather_reference(a, restore, b, 1), x, tokens)
check("decoder_input_gather", out + g, ref + gr)

visible, noise = rand(V, Kp, D, grad=True), rand(V, P, D)
out, g = grads(lambda v: K.decoder_input_scatter(v, keep, noise), visible)
ref, gr = grads(lambda v: K.decoder_input_scatter_reference(v, keep, noise), visible)
check("decoder_input_scatter", out + g, ref + gr)

pred, target, weights = rand(V, P, D, grad=True), rand(N, P, D), torch.rand(V, P, generator=gen)
out, g = grads(lambda p: K.masked_regression(p, target, weights, clone), pred)
ref, gr = grads(lambda p: K.masked_regression_reference(p, target, weights, clone), pred)
check("masked_regression", out + g, ref + gr)

layers = [rand(N, 9, D) for _ in range(3)]
check("layer_averaged_target", K.layer_averaged_target(layers), K.layer_averaged_target_reference(layers))

for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 0.0)):
    y, h = rand(3, 4, 6, dtype=dtype, grad=True), rand(3, 4, 6, dtype=dtype, grad=True)
    out, g = grads(K.norm_gelu_residual, y, h)
    ref, gr = grads(K.norm_gelu_residual_reference, y, h)
    check(f"norm_gelu_residual {dtype}", out + g, ref + gr, tol)
    bias = rand(6, dtype=dtype, grad=True)
    out, g = grads(K.bias_gelu, h, bias)
    ref, gr = grads(K.bias_gelu_reference, h, bias)
    check(f"bias_gelu {dtype}", out + g, ref + gr, tol)
    w, b = rand(6, dtype=dtype, grad=True), rand(6, dtype=dtype, grad=True)
    out, g = grads(K.add_layer_norm, y, h, w, b)
    ref, gr = grads(K.add_layer_norm_reference, y, h, w, b)
    check(f"add_layer_norm {dtype}", out + g, ref + gr, tol)

keep_count, _ = K.mask_counts(64, 0.8, 5)
mask = K.inverse_block_mask(3, (8, 8), 0.8, 5, generator=torch.Generator().manual_seed(3))
assert mask.shape == (3, 64) and mask.dtype == torch.bool
assert torch.equal(mask, K.inverse_block_mask_reference(3, (8, 8), 0.8, 5, generator=torch.Generator().manual_seed(3)))
index = K.keep_index_from_mask(mask, int((~mask).sum(1).min()))
assert not mask.gather(1, index).any()
print("ok masks")

for op in (K.bias_gelu, K.norm_gelu_residual, K.add_layer_norm):
    try:
        op(rand(2, 6), rand(2, 6) if op is not K.bias_gelu else rand(6), use_triton=True)
    except RuntimeError as e:
        assert "needs the triton package" in str(e) and op.__name__ in str(e), e
    else:
        raise AssertionError(f"{op.__name__}(use_triton=True) ran without triton")
print("ok use_triton=True refused")
print("ALL OK")
"""


def test_every_op_and_fused_ema_run_with_triton_hidden():
    done = _run_from_checkout(NO_TRITON, pythonpath=os.path.join(REPO, "kernels"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("ALL OK"), done.stdout
    assert done.stdout.count("ok FusedEMA torch.") == 3


def test_pretraining_step_and_demo_model_run_with_triton_hidden(tmp_path):
    """The fused implementation's CPU step, the EMA update and a checkpoint, as the demo runs them."""
    code = NO_TRITON.split("import torch.nn as nn", 1)[0] + """
import sslam_fast
from sslam_fast.implementation import set_implementation
cfg = sslam_fast.SSLAMConfig(embed_dim=32, depth=2, num_heads=2, decoder_layers=1, decoder_groups=8,
                             average_top_k_layers=2, clone_batch=2, stage=2, mix_window=16, mix_w1_max=32, mix_w2_max=48)
model = sslam_fast.SSLAMPretrainer(cfg)
set_implementation(model, "fused")
fbank = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(0))
out = model(fbank, generator=torch.Generator().manual_seed(1), host_generator=torch.Generator().manual_seed(2))
out["loss"].backward()
model.update_teacher(1)
assert torch.isfinite(out["loss"]) and "triton" not in sys.modules
print("STEP OK", float(out["loss"]))
"""
    done = _run_from_checkout(code, pythonpath=os.pathsep.join([REPO, os.path.join(REPO, "kernels")]))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "STEP OK" in done.stdout
