import pytest
import torch

from sslam_fast.mixing import draw_mix_windows, mixed_row_index, mixed_rows, partial_mixture

from helpers import fbank_batch, tiny_model


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


@pytest.mark.parametrize("windows", [(0, 240), (32, 400), (496, 768), (400, 32)])
def test_mixed_row_index_is_the_mixed_rows_without_bool_indexing(windows):
    rows = mixed_row_index(64, windows, 240)
    assert rows.dtype == torch.int64 and rows.shape == (34,)
    assert torch.equal(rows, mixed_rows(64, windows, 240).nonzero()[:, 0])


def test_windows_come_from_the_host_generator():
    model = tiny_model(stage=2)
    draws = model.draw(2, 1024, "cpu", torch.Generator().manual_seed(0), host_generator=torch.Generator().manual_seed(7))
    assert draws.mix_windows == draw_mix_windows(torch.Generator().manual_seed(7))
