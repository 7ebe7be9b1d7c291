"""Small shared builders for the model tests."""
import torch

from sslam_fast import SSLAMConfig, SSLAMPretrainer


def tiny_config(**overrides) -> SSLAMConfig:
    values = dict(embed_dim=32, depth=3, num_heads=4, average_top_k_layers=3, clone_batch=2,
                  decoder_layers=2, decoder_groups=16)
    values.update(overrides)
    return SSLAMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> SSLAMPretrainer:
    torch.manual_seed(seed)
    model = SSLAMPretrainer(tiny_config(**overrides))
    # Make the teacher differ from the student so that mix-ups show.
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fbank_batch(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, frames, 128, generator=g) * 0.5
