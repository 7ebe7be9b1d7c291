"""EMA update: ``FusedEMA``'s Triton kernel (interpreter on CPU, compiled on CUDA) and its torch
path against the per-tensor reference, on odd shapes, fp32 and bf16 students."""
import zlib

import pytest
import torch
from torch import nn

from sslam_kernels import FusedEMA, ema_update_reference
from sslam_kernels.ema import BLOCK

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# element counts around and across the chunk size, odd shapes, a scalar-like tensor
SHAPES = [(1,), (7, 3), (BLOCK,), (BLOCK + 1,), (3, 7, 257), (2 * BLOCK - 5,), (33, 65)]


def _pairs(student_dtype, gen, device=DEVICE):
    teacher = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    student = [torch.randn(s, generator=gen).to(device, student_dtype) for s in SHAPES]
    return teacher, student


def _expected(teacher, student, decay):
    return [(t.double() * decay + s.double() * (1 - decay)).float() for t, s in zip(teacher, student)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.9998, 0.99999, 0.5])
def test_tensor_lists_match_reference(student_dtype, decay, backend):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{student_dtype}-{decay}".encode()))
    teacher, student = _pairs(student_dtype, gen)
    expected = _expected(teacher, student, decay)
    ref = [t.clone() for t in teacher]
    ema_update_reference(ref, student, decay)
    FusedEMA(student, teacher, backend=backend).update(decay)
    for out, r, e in zip(teacher, ref, expected):
        torch.testing.assert_close(out, e, rtol=2e-7, atol=2e-7)
        torch.testing.assert_close(out, r, rtol=2e-7, atol=2e-7)


def test_decay_changes_without_stale_values():
    gen = torch.Generator().manual_seed(1)
    teacher, student = _pairs(torch.float32, gen)
    ref = [t.clone() for t in teacher]
    ema = FusedEMA(student, teacher, backend="triton")
    for decay in (0.9, 0.99, 0.123):
        ema.update(decay)
        ema_update_reference(ref, student, decay)
    for out, r in zip(teacher, ref):
        torch.testing.assert_close(out, r, rtol=1e-6, atol=1e-6)


def test_unaligned_and_flat_shapes():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(BLOCK + 100, generator=gen).to(DEVICE)
    teacher = [base[1:BLOCK + 1], base[BLOCK + 1:BLOCK + 100]]  # 4-byte, not 16-byte aligned
    student = [torch.randn(BLOCK, generator=gen).to(DEVICE), torch.randn(99, generator=gen).to(DEVICE)]
    expected = _expected(teacher, student, 0.7)
    FusedEMA(student, teacher, backend="triton").update(0.7)
    for out, e in zip(teacher, expected):
        torch.testing.assert_close(out, e, rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rejects_bad_pairs(backend):
    t = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError):
        FusedEMA([torch.zeros(5, device=DEVICE)], [t], backend=backend)
    with pytest.raises(ValueError):
        FusedEMA([t, t], [t], backend=backend)
    with pytest.raises(TypeError):
        FusedEMA([torch.zeros(4, device=DEVICE)], [t.bfloat16()], backend=backend).update(0.9)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 11)
        self.blocks = nn.ModuleList(nn.Linear(11, 11) for _ in range(3))
        self.decoder = nn.Linear(11, 3)


def _twins(student_dtype=torch.float32):
    torch.manual_seed(3)
    student, teacher = _Net().to(DEVICE), _Net().to(DEVICE)
    del teacher.decoder  # the teacher holds no decoder, as in EAT
    return student.to(student_dtype), teacher


class _Wrapped(nn.Module):
    """Stands in for DDP / DeepSpeed wrappers: parameters named ``module.*``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _expected_after(teacher, student, decays):
    s_params = dict(student.named_parameters())
    expected = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    for decay in decays:
        ema_update_reference(list(expected.values()), [s_params[n] for n in expected], decay)
    return expected


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_fused_ema_modules(student_dtype, backend):
    student, teacher = _twins(student_dtype)
    decays = (0.9, 0.999, 0.5)
    expected = _expected_after(teacher, student, decays)
    ema = FusedEMA(_Wrapped(student), teacher, backend=backend)
    for decay in decays:
        ema.update(decay)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6, msg=n)


def test_fused_ema_follows_moved_storage():
    student, teacher = _twins()
    ema = FusedEMA(student, teacher, backend="triton")
    ema.update(0.9)
    for p in teacher.parameters():  # e.g. load_state_dict(assign=True) or .to() rebinding .data
        p.data = p.data.clone()
    expected = _expected_after(teacher, student, [0.8])
    ema.update(0.8)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6, msg=n)


class _WithFixedTable(_Net):
    """A student holding a frozen parameter, as data2vec 2.0's fixed positional table is."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(9, 11), requires_grad=False)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_ema_copies_frozen_parameters(backend):
    torch.manual_seed(5)
    student, teacher = _WithFixedTable().to(DEVICE), _WithFixedTable().to(DEVICE)
    teacher.requires_grad_(False)  # the teacher is frozen as a whole; the student's flags decide
    expected = _expected_after(teacher, student, [0.9])
    expected["positions"] = student.positions.detach().clone()
    ema = FusedEMA(student, teacher, backend=backend)
    ema.update(0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6, msg=n)
    student.embed.weight.requires_grad_(False)  # frozen later: copied from then on
    with torch.no_grad():
        student.positions.add_(1.0)
    expected = _expected_after(teacher, student, [0.5])
    expected["positions"] = student.positions.detach().clone()
    expected["embed.weight"] = student.embed.weight.detach().clone()
    ema.update(0.5)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6, msg=n)


def test_fused_ema_names_subset_and_missing():
    student, teacher = _twins()
    before = teacher.embed.bias.detach().clone()
    FusedEMA(student, teacher, names=["embed.weight"], backend="triton").update(0.5)
    torch.testing.assert_close(teacher.embed.bias.detach(), before, rtol=0, atol=0)
    with pytest.raises(KeyError):
        FusedEMA(teacher, student)  # the teacher lacks the decoder


def _zero3_shard(param, world_size, rank):
    """What DeepSpeed ZeRO-3 leaves on a rank: a flat, padded local partition in ``ds_tensor``."""
    part = -(-param.numel() // world_size)
    flat = torch.zeros(part * world_size, dtype=param.dtype, device=param.device)
    flat[:param.numel()] = param.detach().reshape(-1)
    shard = flat[rank * part:(rank + 1) * part].clone()
    shard.ds_numel = part
    return shard


@pytest.mark.parametrize("teacher_sharded", [False, True])
def test_fused_ema_zero3_local_shards(teacher_sharded):
    world = 3
    student, teacher = _twins(torch.bfloat16)
    expected = _expected_after(teacher, student, [0.75])
    teacher_full = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    for rank in range(world):
        s_rank, t_rank = _twins(torch.bfloat16)
        for (_, ps), (n, pr) in zip(student.named_parameters(), s_rank.named_parameters()):
            pr.ds_tensor = _zero3_shard(ps, world, rank)
            pr.ds_numel = ps.numel()
        for n, pt in t_rank.named_parameters():
            pt.data = teacher_full[n]
            if teacher_sharded:
                pt.ds_tensor = _zero3_shard(pt, world, rank)
        FusedEMA(s_rank, t_rank, shard_rank=lambda p, r=rank: r, backend="triton").update(0.75)
        if teacher_sharded:  # gather the rank's teacher shard back, as an all-gather would
            for n, pt in t_rank.named_parameters():
                part = pt.ds_tensor.numel()
                flat = teacher_full[n].view(-1)
                count = max(0, min(part, flat.numel() - rank * part))
                flat[rank * part:rank * part + count] = pt.ds_tensor[:count]
    for n in expected:
        torch.testing.assert_close(teacher_full[n], expected[n], rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shadow_dtype", [torch.bfloat16, torch.float16])
def test_shadow_is_the_new_teacher_rounded(backend, shadow_dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(7,), (33, 5), (4097,), (2, 3, 4)]
    teacher = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    student = [torch.randn(s, generator=g).to(DEVICE).bfloat16() for s in shapes]
    shadow = [torch.zeros(s, dtype=shadow_dtype, device=DEVICE) for s in shapes]
    want = [t.clone() for t in teacher]
    ema_update_reference(want, student, 0.9)
    ema = FusedEMA(student, teacher, backend=backend, shadow=shadow)
    ema.update(0.9)
    for t, w, sh in zip(teacher, want, shadow):
        torch.testing.assert_close(t, w, rtol=1e-6, atol=1e-6)
        if backend == "torch" or DEVICE == "cuda":
            assert torch.equal(sh, t.to(shadow_dtype))  # round to nearest even, as autocast's casts
        else:  # Triton's CPU interpreter truncates fp32 -> bf16 / fp16 casts: within one unit in the last place
            ulp = t.abs() * torch.finfo(shadow_dtype).eps + torch.finfo(shadow_dtype).tiny
            assert bool(((sh.float() - t).abs() <= ulp).all())
    with pytest.raises(ValueError, match="shadow"):
        FusedEMA(student, teacher, backend=backend, shadow=[s.float() for s in shadow]).update(0.5)
