"""A tiny-config CPU run of a few hundred steps: the loss falls and the targets stay healthy."""
import torch

from helpers import tiny_model


def structured_clips(n: int, frames: int, seed: int) -> torch.Tensor:
    """Normalised fbank-like clips: a few drifting harmonic ridges over noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames).float()[:, None]
    f = torch.arange(128).float()[None]
    clips = []
    for _ in range(n):
        base = int(torch.randint(5, 40, (1,), generator=g))
        drift = float(torch.rand(1, generator=g)) * 0.1
        ridges = sum(torch.exp(-(((f - k * base - drift * t) % 128) ** 2) / 8) for k in range(1, 4))
        clips.append(ridges + 0.3 * torch.randn(frames, 128, generator=g))
    x = torch.stack(clips)[:, None]
    return (x - x.mean()) / (2 * x.std())


def test_loss_falls_and_targets_stay_healthy():
    data = structured_clips(32, 128, seed=0)
    model = tiny_model(stage=1, embed_dim=32, depth=2, average_top_k_layers=2, ema_decay=0.999,
                       ema_end_decay=0.9999, ema_anneal_end_step=200)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(200):
        out = model(data[torch.randint(0, 32, (6,), generator=gen)], generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 4.0)
        opt.step()
        model.update_teacher(step + 1)
        history.append({k: float(out[k].detach()) / (float(out["sample_size"]) if k.endswith("_loss") else 1)
                        for k in ("loss", "patch_loss", "cls_loss", "target_var", "pred_var")})
    first, last = history[:10], history[-10:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    assert mean(last, "loss") < 0.3 * mean(first, "loss")
    assert mean(last, "patch_loss") < mean(first, "patch_loss")
    assert min(r["target_var"] for r in history) > 0.5
    assert min(r["pred_var"] for r in history[-50:]) > 0.05
