"""Layer-averaged targets: the fused instance-norm average (interpreter on CPU) against the
reference, with poisoned outputs and odd shapes."""
import pytest
import torch

import sslam_kernels.targets as targets_module
from sslam_kernels import layer_averaged_target
from sslam_kernels.targets import instance_norm_average_triton, layer_averaged_target_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(targets_module, "_empty",
                        lambda *s, dtype=None, device=None: torch.full(s, float("nan"), dtype=dtype, device=device))


def _layers(N, T, D, K, gen, dtype=torch.float32, with_cls=False):
    # offsets and scales differ per layer and channel, as MLP outputs do
    full = [(torch.randn(N, T + with_cls, D, generator=gen) * (1 + 3 * torch.rand(D, generator=gen))
             + 5 * torch.randn(D, generator=gen)).to(DEVICE, dtype) for _ in range(K)]
    return [x[:, 1:] for x in full] if with_cls else full


@pytest.mark.parametrize("N,T,D,K,with_cls", [
    (1, 2, 1, 1, False), (2, 13, 37, 3, True), (3, 65, 300, 12, True), (1, 300, 5, 2, False),
])
def test_fused_target_matches_reference(N, T, D, K, with_cls):
    gen = torch.Generator().manual_seed(N * 100 + T + D + K)
    layers = _layers(N, T, D, K, gen, with_cls=with_cls)
    ref = layer_averaged_target_reference(layers, 1e-5, 1e-5)
    out = layer_averaged_target(layers, 1e-5, 1e-5, use_triton=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    avg = instance_norm_average_triton(layers, 1e-3)
    expected = sum(torch.nn.functional.instance_norm(x.float().transpose(1, 2), eps=1e-3).transpose(1, 2)
                   for x in layers) / K
    torch.testing.assert_close(avg, expected, rtol=1e-5, atol=1e-5)


def test_mismatched_layers_fall_back_to_reference():
    gen = torch.Generator().manual_seed(0)
    layers = _layers(2, 9, 6, 2, gen) + [_layers(2, 9, 6, 1, gen, with_cls=True)[0]]  # other strides
    torch.testing.assert_close(layer_averaged_target(layers, use_triton=True),
                               layer_averaged_target_reference(layers), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_target_bf16_gpu():
    gen = torch.Generator().manual_seed(1)
    layers = _layers(24, 512, 768, 12, gen, dtype=torch.bfloat16, with_cls=True)
    out = layer_averaged_target(layers)
    ref = layer_averaged_target_reference([x.double() for x in layers]).float()
    # inputs are the same bf16 values and every op runs in fp32: fp32-level agreement
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
