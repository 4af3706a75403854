import torch

from twostage.tokenizers.vq.probe import fit_probe


def test_probe_learns_a_predictable_sequence_better_than_noise():
    torch.manual_seed(0)
    n, d, h, w = 256, 4, 4, 4
    # predictable: every position repeats one random unit vector per image
    base = torch.nn.functional.normalize(torch.randn(n, d, 1, 1), dim=1)
    smooth = base.expand(n, d, h, w).contiguous()
    noise = torch.nn.functional.normalize(torch.randn(n, d, h, w), dim=1)
    kw = dict(steps=150, batch_size=64, width=32, layers=2)
    easy = fit_probe(smooth[:192], smooth[192:], "smooth", **kw)
    hard = fit_probe(noise[:192], noise[192:], "noise", **kw)
    assert len(easy.val_error_per_position) == h * w
    # after the first position the repeated vector is known: error drops far below noise's
    assert sum(easy.val_error_per_position[1:]) / (h * w - 1) < 0.2
    assert hard.val_error > 0.8  # unit vectors in random directions stay unpredictable (~1)
