import pytest
import torch

from sslam_fast.mixing import draw_mix_windows, mixed_rows, partial_mixture

from helpers import fbank_batch


def test_windows_follow_the_recipe_over_many_seeds():
    seen_w1 = set()
    for seed in range(300):
        w1, w2 = draw_mix_windows(torch.Generator().manual_seed(seed))
        assert w1 % 16 == 0 and w2 % 16 == 0
        assert 0 <= w1 <= 496 and w1 + 240 <= w2 <= 782
        seen_w1.add(w1)
    assert min(seen_w1) == 0 and max(seen_w1) == 496


def test_mixture_is_base_inside_windows_and_max_outside():
    x = fbank_batch(5, 1024, seed=1)
    w1, w2 = 96, 512
    mix = partial_mixture(x, (w1, w2))
    partner = torch.roll(x, 1, 0)
    inside = torch.zeros(1024, dtype=torch.bool)
    inside[w1:w1 + 240] = True
    inside[w2:w2 + 240] = True
    assert torch.equal(mix[:, :, inside], x[:, :, inside])
    assert torch.equal(mix[:, :, ~inside], torch.maximum(x, partner)[:, :, ~inside])
    # Clip 0's partner is the last clip of the batch.
    assert torch.equal(mix[0, :, ~inside], torch.maximum(x[0], x[-1])[:, ~inside])
    assert int((~inside).sum()) == 544


def test_mixed_rows_count():
    rows = mixed_rows(64, (0, 768), 240)
    assert rows.shape == (64,) and int(rows.sum()) == 34
    assert not rows[:15].any() and rows[15] and not rows[48:63].any() and rows[63]


def test_windows_must_fit():
    with pytest.raises(ValueError, match="do not fit"):
        draw_mix_windows(num_frames=512)
