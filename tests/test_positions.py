"""Every form of the position maths in `additive_pos_attn.positions`, against plain indexing and hand-written formulas
(the chapter keeps two or three examples of each); T5's buckets at every offset against the plain-Python formula
(Hugging Face's own function in `tests/test_hf_t5.py`)."""
import math

import pytest
import torch

from additive_pos_attn.positions import (causal_mask, init_table_, padded_positions, positional_update,
                                         relative_bias, resample_table, sinusoidal_table, t5_bucket)
from additive_pos_attn.relative import t5_bucket_reference
from cases import T5_OPTIONS


def test_positional_update_matches_indexing():
    E = torch.randn(10, 4)
    assert torch.equal(positional_update(E, None, None, 3), E[:3])
    assert torch.equal(positional_update(E, torch.tensor([7, 0, 7]), None, 3), E[[7, 0, 7]])
    per_sample = torch.tensor([[1, 2, 3], [9, 8, 7]])
    expected = torch.stack([E[[1, 2, 3]], E[[9, 8, 7]]])
    assert torch.equal(positional_update(E, per_sample, None, 3), expected)
    assert torch.equal(positional_update(E, per_sample.to(torch.uint8), None, 3), expected)  # never read as a bool mask
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(positional_update(E, None, mask, 3), torch.where(mask[..., None], E[:3], 0.))
    assert torch.equal(positional_update(E, per_sample, mask, 3), torch.where(mask[..., None], expected, 0.))
    shared_mask = torch.tensor([False, True, True])
    assert torch.equal(positional_update(E, torch.tensor([4, 5, 6]), shared_mask, 3), torch.where(shared_mask[:, None], E[[4, 5, 6]], 0.))


def test_causal_mask_is_top_left_aligned():
    assert torch.equal(causal_mask(3, 3), torch.tensor([[False, True, True], [False, False, True], [False, False, False]]))
    for q_len, k_len in ((1, 4), (4, 2), (0, 3)):
        assert torch.equal(causal_mask(q_len, k_len), torch.tensor([[j > i for j in range(k_len)] for i in range(q_len)], dtype=torch.bool).reshape(q_len, k_len))


@pytest.mark.parametrize('dim', [6, 7])
def test_sinusoidal_table_matches_the_formula(dim):
    table = sinusoidal_table(5, dim, dtype=torch.float64)
    assert table.shape == (5, dim)
    for p in range(5):
        for c in range(dim):
            angle = p / 10000 ** ((c - c % 2) / dim)
            assert abs(table[p, c].item() - (math.sin(angle) if c % 2 == 0 else math.cos(angle))) < 1e-12


def test_init_table_fills_in_place():
    table = torch.ones(4, 6)
    assert init_table_(table, 'zeros') is table and table.abs().sum() == 0


def _by_hand(table, new_len):
    "New row j reads the old table at x = j (L - 1) / (L' - 1) and blends rows floor(x) and ceil(x)."
    rows = []
    for j in range(new_len):
        x = j * (table.shape[0] - 1) / (new_len - 1)
        lo, frac = int(math.floor(x)), x - math.floor(x)
        rows.append(table[lo] * (1 - frac) + table[min(lo + 1, table.shape[0] - 1)] * frac)
    return torch.stack(rows)


@pytest.mark.parametrize('new_len', [2, 3, 5, 9, 17])
def test_resample_table_matches_hand_interpolation(new_len):
    table = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(resample_table(table, new_len), _by_hand(table, new_len), rtol=0, atol=1e-12)


def test_resample_table_edges_and_refusals():
    table = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(resample_table(table, 5), table)
    assert torch.equal(resample_table(table, 1), table[:1])
    assert torch.equal(resample_table(table[:1], 3), table[:1].expand(3, -1))
    assert resample_table(table.bfloat16(), 8).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"new_len must be a positive int, got 0"): resample_table(table, 0)
    with pytest.raises(ValueError, match=r"table must be 2-D \(L, D\), got shape \(3,\)"): resample_table(table[0], 4)
    with pytest.raises(TypeError, match=r"table must be a floating-point Tensor, got torch.int64"): resample_table(table.long(), 4)


def test_padded_positions_refusals():
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    assert not padded_positions(lengths=torch.tensor([3, 5, 0]), seq_len=5)[1][2].any()
    cases = [(ValueError, "exactly one of key_padding_mask and lengths, got neither", lambda: padded_positions()),
             (ValueError, "got both", lambda: padded_positions(kpm, lengths=torch.tensor([1, 2, 3]), seq_len=5)),
             (ValueError, r"lengths must be 1-D \(B,\), got shape \(1, 2\)", lambda: padded_positions(lengths=torch.tensor([[1, 2]]), seq_len=5)),
             (ValueError, r"lengths must lie in \[0, seq_len=5\], got values from -1 to 2", lambda: padded_positions(lengths=torch.tensor([-1, 2]), seq_len=5)),
             (TypeError, r"lengths must be an integer Tensor, got torch.float32", lambda: padded_positions(lengths=torch.tensor([3.]), seq_len=4)),
             (TypeError, r"seq_len must be an int, got float 4.0", lambda: padded_positions(lengths=torch.tensor([3]), seq_len=4.0)),
             (TypeError, r"key_padding_mask must be a bool Tensor, got torch.int64", lambda: padded_positions(kpm.long())),
             (ValueError, r"key_padding_mask must be 2-D \(B, T\), got shape \(5,\)", lambda: padded_positions(kpm[0]))]
    for error, message, call in cases:
        with pytest.raises(error, match=message): call()


def _relative_by_hand(table, qp, kp, qm, km, max_distance, num_heads, t5=None):
    """The relative bias by loops: (B, H, T_q, T_k) for per-sample positions and masks (B, T); with `t5` (the bucket
    options) the row of T5's bucket of the unclipped `p_k - p_q`."""
    B, Tq, Tk = qp.shape[0], qp.shape[1], kp.shape[1]
    out = torch.zeros(B, num_heads, Tq, Tk, dtype=table.dtype)
    for b in range(B):
        for h in range(num_heads):
            for i in range(Tq):
                for j in range(Tk):
                    if not (qm[b, i] and km[b, j]): continue
                    offset = int(qp[b, i]) - int(kp[b, j])
                    row = (max(-max_distance, min(max_distance, offset)) + max_distance if t5 is None
                           else t5_bucket_reference(-offset, max_distance=max_distance, **t5))
                    out[b, h, i, j] = table[row, h] if table.dim() == 2 else table[row]
    return out


BUCKETS = {'clipped': (2, None), 'T5 encoder': (5, dict(num_buckets=8, bidirectional=True)),
           'T5 decoder': (6, dict(num_buckets=9, bidirectional=False))}  # max_distance and T5's options


@pytest.mark.parametrize('per_head', [True, False])
@pytest.mark.parametrize('kind', ['default', 'default masks', 'shared', 'per-sample', 'masks', 'per-sample masks'])
@pytest.mark.parametrize('buckets', BUCKETS.values(), ids=BUCKETS.keys())
def test_relative_bias_matches_loops(per_head, kind, buckets):
    torch.manual_seed(0)
    (B, Tq, Tk, H), (m, t5) = (2, 4, 6, 3), buckets
    rows = 2 * m + 1 if t5 is None else t5['num_buckets']
    table = torch.randn(rows, H, dtype=torch.float64) if per_head else torch.randn(rows, dtype=torch.float64)
    qp, kp = torch.arange(Tq), torch.arange(Tk)
    qm, km = None, None
    if kind == 'shared': qp, kp = torch.tensor([5, -3, 0, 9]), torch.tensor([-7, 0, 1, 2, 30, 4], dtype=torch.int16)
    if kind in ('per-sample', 'per-sample masks'): qp, kp = torch.randint(-20, 20, (B, Tq)), torch.randint(-20, 20, (B, Tk)).to(torch.int32)
    if kind in ('masks', 'default masks'): qm, km = torch.tensor([True, False, True, True]), torch.tensor([True] * 4 + [False] * 2)
    if kind == 'per-sample masks': qm, km = torch.rand(B, Tq) < 0.7, torch.rand(B, Tk) < 0.7
    kw = dict(q_len=Tq, k_len=Tk, max_distance=m, num_heads=H)
    if t5 is not None: kw['buckets'] = t5_bucket(-torch.arange(-m, m + 1), max_distance=m, **t5)
    default = kind.startswith('default')
    bias = relative_bias(table, None if default else qp, None if default else kp, qm, km, **kw)
    per_sample = kind.startswith('per-sample')
    assert bias.shape == ((B, H, Tq, Tk) if per_sample else (H, Tq, Tk))
    expand = lambda t, T: (t if t.dim() == 2 else t.expand(B, T))
    ones = lambda T: torch.ones(B, T, dtype=torch.bool)
    expected = _relative_by_hand(table, expand(qp, Tq), expand(kp, Tk), ones(Tq) if qm is None else expand(qm, Tq),
                                 ones(Tk) if km is None else expand(km, Tk), m, H, t5)
    torch.testing.assert_close(bias.expand(B, H, Tq, Tk), expected, rtol=0, atol=0)


@pytest.mark.parametrize('per_head', [True, False])
@pytest.mark.parametrize('buckets', BUCKETS.values(), ids=BUCKETS.keys())
@pytest.mark.parametrize('q_len, k_len', [(1, 1), (1, 9), (9, 1), (3, 11), (11, 3), (16, 16)])
@pytest.mark.parametrize('grad', [True, False])
def test_offset_windows_are_the_gather_of_the_default_positions(per_head, buckets, q_len, k_len, grad):
    """The default positions' bias (`offset_windows`: one row of offsets, unfolded, flipped) equals the gather at the
    positions written out, with lengths on either side of max_distance; with gradients, the table's too (float64)."""
    torch.manual_seed(0)
    (m, t5), H = buckets, 3
    rows = 2 * m + 1 if t5 is None else t5['num_buckets']
    table = torch.randn(rows, H, dtype=torch.float64) if per_head else torch.randn(rows, dtype=torch.float64)
    kw = dict(q_len=q_len, k_len=k_len, max_distance=m, num_heads=H)
    if t5 is not None: kw['buckets'] = t5_bucket(-torch.arange(-m, m + 1), max_distance=m, **t5)
    weights = torch.randn(H, q_len, k_len, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        table.requires_grad_(grad)
        windows = relative_bias(table, None, None, **kw)
        gathered = relative_bias(table, torch.arange(q_len), torch.arange(k_len), **kw)
        assert windows.shape == (H, q_len, k_len) and torch.equal(windows, gathered)
        if grad:
            torch.testing.assert_close(*(torch.autograd.grad((b * weights).sum(), table)[0] for b in (windows, gathered)),
                                       rtol=0, atol=1e-12)

def test_relative_bias_gradient_reaches_the_used_rows():
    table = torch.zeros(7, 2, dtype=torch.float64, requires_grad=True)
    relative_bias(table, torch.tensor([0, 1]), torch.tensor([0, 10]), q_len=2, k_len=2, max_distance=3, num_heads=2).sum().backward()
    assert (table.grad.abs().sum(-1) > 0).nonzero().flatten().tolist() == [0, 3, 4]  # offsets -10, -9 (clipped to -3), 0, 1


def test_relative_bias_gradient_gathers_each_buckets_offsets():
    "Every pair adds one to its bucket's gradient: offsets sharing a bucket add up, as in T5's embedding lookup."
    table = torch.zeros(8, 2, dtype=torch.float64, requires_grad=True)
    qp, kp = torch.tensor([0, 3, 40]), torch.tensor([0, 1, 2, 9, -30])
    buckets = t5_bucket(-torch.arange(-6, 7), num_buckets=8, max_distance=6)
    relative_bias(table, qp, kp, q_len=3, k_len=5, max_distance=6, num_heads=2, buckets=buckets).sum().backward()
    counts = torch.bincount(t5_bucket(kp[None, :] - qp[:, None], num_buckets=8, max_distance=6).flatten(), minlength=8)
    assert torch.equal(table.grad, counts[:, None].double().expand(8, 2))


# max_distance and T5's options, among them Hugging Face's defaults (32, 128), odd counts, the smallest valid ones, a
# max_distance next to the exact offsets, and edges where float32 and float64 disagree (18 and 9 buckets at 128)


@pytest.mark.parametrize('max_distance, num_buckets, bidirectional', T5_OPTIONS)
def test_t5_bucket_is_the_formula_at_every_offset(max_distance, num_buckets, bidirectional):
    """Every offset from -4·max_distance to 4·max_distance against the plain-Python formula (float32 rounding of each
    step); offsets past ±max_distance fall where ±max_distance do, so clipping first changes nothing."""
    t5 = dict(num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    offsets = torch.arange(-4 * max_distance, 4 * max_distance + 1)
    buckets = t5_bucket(offsets, **t5)
    assert buckets.dtype == torch.int64 and buckets.tolist() == [t5_bucket_reference(d, **t5) for d in offsets.tolist()]
    assert torch.equal(t5_bucket(offsets.clamp(-max_distance, max_distance), **t5), buckets)
    side = num_buckets // 2 if bidirectional else num_buckets
    after, before = buckets[offsets > 0], buckets[offsets <= 0].flip(0)  # by distance from the query
    assert torch.equal(before[:side // 2], torch.arange(side // 2))  # the exact ones
    assert (before.diff() >= 0).all() and before.max() == side - 1
    if bidirectional: assert torch.equal(after, before[1:] + side)  # the same ranges, in the other half
    else: assert (after == 0).all()


def test_t5_bucket_keeps_shapes_and_takes_every_integer_dtype():
    t5 = dict(num_buckets=32, max_distance=128)
    offsets = torch.randint(-127, 128, (3, 4, 5))
    expected = t5_bucket(offsets, **t5)
    assert expected.shape == (3, 4, 5)
    for dtype in (torch.int32, torch.int16, torch.int8):
        assert torch.equal(t5_bucket(offsets.to(dtype), **t5), expected)
    assert t5_bucket(torch.tensor(-200), **t5).item() == 15 and t5_bucket(torch.zeros(0, dtype=torch.long), **t5).numel() == 0


def test_t5_bucket_refusals():
    offsets = torch.arange(-3, 4)
    cases = [(TypeError, r"num_buckets must be an int, got float 32.0", dict(num_buckets=32.0)),
             (ValueError, r"num_buckets must be a positive int, got 0", dict(num_buckets=0)),
             (ValueError, r"num_buckets must be at least 4 with bidirectional=True \(half of each side's buckets hold exact "
                          r"offsets, one at least\), got 3", dict(num_buckets=3)),
             (ValueError, r"num_buckets must be at least 2 with bidirectional=False", dict(num_buckets=1, bidirectional=False)),
             (TypeError, r"bidirectional must be a bool, got int 1", dict(bidirectional=1)),
             (TypeError, r"max_distance must be an int, got NoneType None", dict(max_distance=None)),
             (ValueError, r"max_distance must exceed the 8 exact offsets of num_buckets=32 with bidirectional=True, got 8",
              dict(max_distance=8)),
             (ValueError, r"max_distance must exceed the 16 exact offsets of num_buckets=32 with bidirectional=False, got 16",
              dict(max_distance=16, bidirectional=False)),
             (TypeError, r"relative_position must be an integer Tensor, got torch.float32", dict(relative_position=offsets.float())),
             (TypeError, r"relative_position must be an integer Tensor, got list", dict(relative_position=[0, 1]))]
    for error, message, kw in cases:
        kw = {'relative_position': offsets, 'num_buckets': 32, 'max_distance': 128, **kw}
        with pytest.raises(error, match=message): t5_bucket(kw.pop('relative_position'), **kw)
