"""2D RoPE: rows rotate the first half of each head, columns the second; the prefix is unrotated."""

from __future__ import annotations

import pytest
import torch

from twostage.nn.rope import apply_rope, rope_2d_tables, rope_frequencies


def reference_rotation(x: torch.Tensor, row: int, col: int, base: float = 10000.0) -> torch.Tensor:
    """Independent reference: each half as F complex numbers (a_j + i b_j), multiplied by e^{i pos f_j}."""
    d = x.shape[-1]
    f = d // 4
    freqs = base ** (-torch.arange(f, dtype=torch.float64) / f)
    out = []
    for half, pos in ((x[: d // 2], row), (x[d // 2 :], col)):
        z = torch.complex(half[:f].double(), half[f:].double()) * torch.polar(torch.ones(f, dtype=torch.float64), pos * freqs)
        out += [z.real, z.imag]
    return torch.cat(out).float()


def test_rows_rotate_the_first_half_and_columns_the_second():
    grid, d = (3, 5), 16
    cos, sin = rope_2d_tables(grid, d, prefix=1)
    assert cos.shape == (1 + 15, d)
    x = torch.randn(1 + 15, 1, d)  # (T, heads, D)
    y = apply_rope(x, cos[:, None], sin[:, None])
    for g in range(15):
        r, c = divmod(g, grid[1])
        torch.testing.assert_close(y[1 + g, 0], reference_rotation(x[1 + g, 0], r, c), rtol=1e-5, atol=1e-5)
    # tokens of one row share the row half's rotation; tokens of one column share the column half's
    row_half = y[1:, 0, : d // 2] - x[1:, 0, : d // 2]
    torch.testing.assert_close(y[1, 0, : d // 2], x[1, 0, : d // 2])  # (0, 0): identity
    assert not torch.allclose(row_half[grid[1]], torch.zeros(d // 2))  # row 1 rotates the row half


def test_the_prefix_token_is_not_rotated():
    cos, sin = rope_2d_tables((4, 4), 8, prefix=2)
    assert torch.equal(cos[:2], torch.ones(2, 8)) and torch.equal(sin[:2], torch.zeros(2, 8))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(apply_rope(x, cos[:2, None], sin[:2, None]), x, rtol=0, atol=0)


def test_attention_scores_depend_only_on_the_2d_offset():
    grid, d = (6, 6), 32
    cos, sin = rope_2d_tables(grid, d, prefix=1)
    q, k = torch.randn(d), torch.randn(d)

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        ia, ib = 1 + a[0] * grid[1] + a[1], 1 + b[0] * grid[1] + b[1]
        qa = apply_rope(q.view(1, 1, d), cos[ia].view(1, 1, d), sin[ia].view(1, 1, d))
        kb = apply_rope(k.view(1, 1, d), cos[ib].view(1, 1, d), sin[ib].view(1, 1, d))
        return float((qa * kb).sum())

    assert abs(score((1, 2), (3, 0)) - score((2, 4), (4, 2))) < 1e-4  # same (dr, dc) = (2, -2)
    assert abs(score((1, 2), (3, 0)) - score((1, 2), (0, 3))) > 1e-3  # transposed offset differs


def test_frequencies_follow_the_llamagen_ladder():
    f = rope_frequencies(64, 10000.0)
    assert f.shape == (16,) and f[0] == 1.0
    torch.testing.assert_close(f, 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32))


def test_tables_without_a_prefix_are_the_grid_rows_of_the_prefixed_ones():
    # The DiT uses no prefix, the AR model and the CRT predictor one: the grid rows are the same.
    cos0, sin0 = rope_2d_tables((3, 4), 16)
    cos1, sin1 = rope_2d_tables((3, 4), 16, prefix=1)
    assert cos0.shape == (12, 16) and torch.equal(cos0, cos1[1:]) and torch.equal(sin0, sin1[1:])


def test_a_zero_prefix_erases_the_class_tokens_queries_and_keys():
    """prefix_rope="zero" (LlamaGen's table, for converted checkpoints): the prefix rows are cos = sin = 0,
    so the rotated query / key of the class token vanish; the grid rows are those of the default table."""
    cos, sin = rope_2d_tables((2, 3), 8, prefix=1, prefix_rope="zero")
    ref_cos, ref_sin = rope_2d_tables((2, 3), 8, prefix=1)
    assert torch.equal(cos[1:], ref_cos[1:]) and torch.equal(sin[1:], ref_sin[1:])
    x = torch.randn(2, 7, 1, 8)  # (batch, prefix + h*w, heads, head_dim)
    out = apply_rope(x, cos[:, None], sin[:, None])
    assert torch.count_nonzero(out[:, 0]) == 0
    assert torch.equal(out[:, 1:], apply_rope(x, ref_cos[:, None], ref_sin[:, None])[:, 1:])
    with pytest.raises(ValueError, match="prefix_rope"):
        rope_2d_tables((2, 3), 8, prefix=1, prefix_rope="none")
