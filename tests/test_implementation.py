"""One switch picks how the model's ops run (fused / reference / compiled), applied from outside."""
import copy
import dataclasses

import pytest
import torch

from helpers import fbank_batch, tiny_model
from sslam_fast import Draws, load_pretrainer, save_pretrainer
from sslam_fast.config import ConfigError
from sslam_fast.implementation import FUSED, IMPLEMENTATIONS, ORIGINAL, REFERENCE, set_implementation
from sslam_fast.trainer.config import load_config


def test_set_implementation_reaches_every_module():
    model = tiny_model(stage=2)
    assert model.ops is FUSED and model.student.ops is FUSED
    set_implementation(model, "reference")
    holders = [m for m in model.modules() if hasattr(m, "ops")]
    assert {id(m) for m in holders} >= {id(model), id(model.student), id(model.teacher)}
    assert all(m.ops is REFERENCE for m in holders)
    with pytest.raises(ValueError, match="implementation must be one of"):
        set_implementation(model, "triton")


def test_every_op_is_read_from_the_ops_attribute():
    """The model calls each op through ``ops``, so the switch reaches every one of them."""
    calls = []

    def counting(name, fn):
        return lambda *a, **k: (calls.append(name), fn(*a, **k))[1]

    model = set_implementation(tiny_model(stage=2), "reference")
    names = [f.name for f in dataclasses.fields(REFERENCE) if callable(getattr(REFERENCE, f.name))]
    ops = dataclasses.replace(REFERENCE, **{n: counting(n, getattr(REFERENCE, n)) for n in names})
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    out = model(fbank_batch(2, 1024), generator=torch.Generator().manual_seed(0))
    model.update_teacher(1)
    assert torch.isfinite(out["loss"]) and sorted(set(calls)) == sorted(names)
    assert model._ema[1].backend == "torch"


def test_reference_ops_are_the_plain_pytorch_ones():
    import sslam_kernels

    assert REFERENCE.inverse_block_mask is sslam_kernels.inverse_block_mask_reference
    assert REFERENCE.ema_backend == "torch" and FUSED.ema_backend == "auto"
    for name in ("embed_mask_gather", "decoder_input_scatter", "layer_averaged_target", "masked_regression",
                 "norm_gelu_residual", "bias_gelu", "add_layer_norm"):
        op = getattr(REFERENCE, name)
        assert op.func is getattr(sslam_kernels, name) and op.keywords == {"use_triton": False}


def step(model, seed=0):
    x = fbank_batch(2, 1024, seed=seed)
    draws = model.draw(2, 1024, "cpu", torch.Generator().manual_seed(seed))
    out = model(x, draws=Draws(draws.masks, draws.mix_windows, draws.decoder_noise))
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])
    return out, grads


def test_compiled_matches_reference():
    reference = set_implementation(tiny_model(stage=2, depth=1, average_top_k_layers=1, decoder_layers=1), "reference")
    compiled = tiny_model(stage=2, depth=1, average_top_k_layers=1, decoder_layers=1)
    compiled.load_state_dict(reference.state_dict())
    set_implementation(compiled, "compiled")
    ref, ref_grads = step(reference)
    out, grads = step(compiled)
    for key in ("loss", "patch_loss", "cls_loss", "srl_loss"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=5e-6)  # fp32 sums reordered across the step
    encoder = set_implementation(tiny_model(stage=1, depth=2, average_top_k_layers=2).student, "compiled")  # its blocks
    assert all(b._compiled_call_impl is not None for b in encoder.blocks)


def test_original_runs_eager_attention_the_torch_ema_and_the_gathered_losses(monkeypatch):
    import sslam_fast.model

    assert IMPLEMENTATIONS == ("fused", "reference", "compiled", "original")
    model = tiny_model(stage=2)
    reference = tiny_model(stage=2)
    set_implementation(model, "original")
    attentions = [m for m in model.modules() if isinstance(m, sslam_fast.model.Attention)]
    assert attentions and all(m.ops is ORIGINAL and m.mode == "auto" for m in attentions)
    assert ORIGINAL.ema_backend == "torch" and not ORIGINAL.static_shapes
    modes = []
    real = sslam_fast.model.attention
    monkeypatch.setattr(sslam_fast.model, "attention", lambda q, k, v, mode: (modes.append(mode), real(q, k, v, mode))[1])
    out, grads = step(model)
    assert set(modes) == {"eager"}
    model.update_teacher(1)
    assert model._ema[1].backend == "torch"
    set_implementation(model, "fused")  # the switch goes back: the configured mode again
    modes.clear()
    step(model)
    assert set(modes) == {"auto"}
    ref, ref_grads = step(set_implementation(reference, "reference"))
    for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "target_var", "pred_var"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert "ops" not in model.state_dict() and model.cfg.attention == "auto"


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", ["fused", "reference"])
def test_dense_losses_match_the_gathered_ones(stage, name):
    """Dense masked sums from the static mask count give the gathered (original) losses."""
    model = tiny_model(stage=stage)
    x = fbank_batch(3, 1024, seed=stage)
    draws = model.draw(3, 1024, "cpu", torch.Generator().manual_seed(stage))
    set_implementation(model, "original")
    want = model(x, draws=draws)
    set_implementation(model, name)
    got = model(x, draws=draws)
    for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "target_var", "pred_var"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert got["sample_size"].dtype == torch.int64 and int(got["sample_size"]) == int(want["sample_size"])


def test_the_trainer_picks_the_implementation_from_its_execution():
    def picked(*sets):
        return load_config(None, ["data.demo_clips=4", *sets]).train.model_implementation

    assert picked() == "fused"
    assert picked("train.compile=true") == "compiled"
    assert picked("train.execution=original", "train.precision=fp32") == "original"
    with pytest.raises(ConfigError, match="unknown key 'implementation'"):
        load_config(None, ["data.demo_clips=4", "train.implementation=reference"])  # no second switch


def test_checkpoints_with_the_former_use_kernels_key_still_load(tmp_path):
    model = tiny_model()
    path = tmp_path / "own.pt"
    save_pretrainer(model, str(path))
    raw = torch.load(path, weights_only=True)
    raw["config"]["use_kernels"] = False
    torch.save(raw, path)
    loaded = load_pretrainer(str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("stage", [1, 2])
def test_teacher_shadow_under_autocast_gives_the_cast_teacher_values(stage):
    """Under bf16 autocast the teacher passes run a bf16 shadow that the EMA update rewrites; the
    results are those of casting the fp32 teacher on every pass, and the shadow follows changes."""
    with_shadow = tiny_model(stage=stage)
    without = tiny_model(stage=stage)
    without.ops = dataclasses.replace(FUSED, teacher_shadow=False)
    x = fbank_batch(2, 1024)
    draws = with_shadow.draw(2, 1024, "cpu", torch.Generator().manual_seed(stage))
    assert with_shadow.forward_teacher() is with_shadow.teacher  # no autocast: the fp32 teacher
    for step_ in range(2):
        outs = []
        for model in (with_shadow, without):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(model(x, draws=draws))
            model.update_teacher(step_)
        for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "target_var"):
            torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shadow = with_shadow.forward_teacher()
        assert shadow is not with_shadow.teacher and shadow.cls_token.dtype == torch.bfloat16
        assert shadow.pos_table.dtype == torch.float32
        for s, t in zip(shadow.parameters(), with_shadow.teacher.parameters()):
            assert torch.equal(s, t.bfloat16())
        with torch.no_grad():
            with_shadow.teacher.cls_token.add_(1.0)  # a change outside update_teacher
        assert torch.equal(with_shadow.forward_teacher().cls_token, with_shadow.teacher.cls_token.bfloat16())
    assert not any("shadow" in k for k in with_shadow.state_dict())


def test_compiled_pretrainer_runs_its_step_as_one_graph():
    """"compiled" compiles the pretrainer's static-shape step whole (fullgraph=True: a graph break
    raises), teacher passes on the bf16 shadow included; its losses under bf16 autocast are as
    close to the fp32 step's as the eager bf16 step's; a step with new mix windows reuses the
    graph. Another implementation drops it again."""
    eager = tiny_model(stage=2, depth=1, average_top_k_layers=1, decoder_layers=1)
    compiled = set_implementation(tiny_model(stage=2, depth=1, average_top_k_layers=1, decoder_layers=1), "compiled")
    compiled.load_state_dict(eager.state_dict())
    assert "step" in compiled.__dict__ and not any(
        getattr(m, "_compiled_call_impl", None) is not None for m in compiled.modules())
    x = fbank_batch(2, 1024)
    draws = eager.draw(2, 1024, "cpu", torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = eager(x, draws=draws), compiled(x, draws=draws)
    exact = eager(x, draws=draws)
    for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "target_var"):
        err, eager_err = (got[key] - exact[key]).abs(), (want[key] - exact[key]).abs()
        assert err <= 2 * eager_err + 1e-3 * exact[key].abs(), (key, float(err), float(eager_err))
    got["loss"].backward()
    assert all(p.grad is not None for p in compiled.student.parameters())
    from torch._dynamo.utils import counters

    counters.clear()
    other = eager.draw(2, 1024, "cpu", torch.Generator().manual_seed(1))
    assert other.mix_windows != draws.mix_windows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x, draws=other)
    assert counters["stats"]["unique_graphs"] == 0  # new windows, same graph (a tensor input)
    assert "step" not in copy.deepcopy(compiled).__dict__  # it is bound to the original
    assert "step" not in set_implementation(compiled, "fused").__dict__


@pytest.mark.parametrize("stage", [1, 2])
def test_variances_only_when_asked(stage):
    """``stats=False`` (the trainer's non-logging steps) leaves out target_var and pred_var and
    changes nothing else; "original" computes them every step, as the original code does."""
    model = tiny_model(stage=stage)
    x = fbank_batch(2, 1024)
    draws = model.draw(2, 1024, "cpu", torch.Generator().manual_seed(stage))
    full = model(x, draws=draws)
    lean = model(x, draws=draws, stats=False)
    assert {"target_var", "pred_var"} <= set(full) and not {"target_var", "pred_var"} & set(lean)
    for key in ("loss", "patch_loss", "cls_loss", "srl_loss", "sample_size"):
        assert torch.equal(full[key], lean[key]), key
    assert "target_var" in set_implementation(model, "original")(x, draws=draws, stats=False)
