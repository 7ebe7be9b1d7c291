"""The Triton paths as torch.library ops: schema, fake (meta) implementation, autograd
registration and AOT dispatch checked by ``torch.library.opcheck`` on odd shapes (interpreter on
CPU), and the public functions reach them only for the Triton path."""
import pytest
import torch

from sslam_kernels import embed_mask_gather  # importing the package registers torch.ops.sslam_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.sslam_kernels


def _randn(*shape, gen, grad=False):
    return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(grad)


def _keep(views, P, K, gen):
    return torch.stack([torch.randperm(P, generator=gen)[:K] for _ in range(views)]).to(DEVICE)


@pytest.mark.parametrize("with_pos, with_prefix, with_index", [(True, True, True), (False, False, True),
                                                               (True, False, False)])
def test_embed_mask_gather_ops(with_pos, with_prefix, with_index):
    gen = torch.Generator().manual_seed(0)
    N, P, D, clone, K = 2, 7, 5, 3, 4
    patches = _randn(N, P, D, gen=gen, grad=True)
    pos = _randn(P, D, gen=gen) if with_pos else None
    prefix = _randn(2, D, gen=gen, grad=True) if with_prefix else None
    keep = _keep(N * clone, P, K, gen) if with_index else None
    torch.library.opcheck(ops.embed_mask_gather, (patches, pos, prefix, keep, clone, torch.float32))
    grad_out = _randn(N * clone, (2 if with_prefix else 0) + (K if with_index else P), D, gen=gen)
    torch.library.opcheck(ops.embed_mask_gather_backward,
                          (grad_out, keep, N, P, clone, 2 if with_prefix else 0, torch.float32))


def test_decoder_ops():
    gen = torch.Generator().manual_seed(1)
    V, P, K, D = 3, 9, 4, 6
    x = _randn(V, 1 + K, D, gen=gen, grad=True)
    restore = torch.stack([torch.randperm(P, generator=gen) for _ in range(V)]).to(DEVICE)
    tokens = _randn(V, P - K, D, gen=gen, grad=True)
    torch.library.opcheck(ops.decoder_input_gather, (x, restore, tokens, 1))
    keep = _keep(V, P, K, gen)
    torch.library.opcheck(ops.decoder_input_scatter, (_randn(V, K, D, gen=gen, grad=True), keep,
                                                      _randn(V, P, D, gen=gen)))
    torch.library.opcheck(ops.gather_rows, (_randn(V, P, D, gen=gen), keep, 2, torch.float32))


def test_instance_norm_average_op():
    gen = torch.Generator().manual_seed(2)
    layers = [_randn(2, 5, 7, gen=gen) for _ in range(3)]
    torch.library.opcheck(ops.instance_norm_average, (layers, 1e-5))


def test_reference_path_does_not_call_the_op(monkeypatch):
    import sslam_kernels.gather as gather_module

    def unexpected(*args):
        raise AssertionError("the op ran for the reference path")
    monkeypatch.setattr(gather_module, "_embed_mask_gather_op", unexpected)
    patches = torch.randn(2, 4, 3)
    out = embed_mask_gather(patches, torch.randn(4, 3), None, None, 1, use_triton=False)
    assert out.shape == (2, 4, 3)
