"""Hypothesis strategies shared by the property tests of every layer: sizes, positions, position masks and
attention masks of random valid calls, and the settings that make each run check the same examples."""
import warnings

import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

from additive_pos_attn.positions import causal_mask
from cases import DTYPE

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def draw_positions(data, stream, B, T, low, high, absent=True):
    "Draw positions in `[low, high]` for one stream: absent (if `absent`), shared `(T,)` or per-sample `(B, T)`, any int dtype."
    kinds = (['absent'] if absent else []) + ['shared', 'per-sample']
    kind = data.draw(st.sampled_from(kinds), label=f'{stream} positions')
    if kind == 'absent': return None, None
    shape = (T,) if kind == 'shared' else (B, T)
    values = data.draw(st.lists(st.integers(low, high), min_size=B * T if kind == 'per-sample' else T,
                                max_size=B * T if kind == 'per-sample' else T), label=f'{stream} position values')
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16] + ([torch.uint8] if low >= 0 and high < 256 else [])),
                      label=f'{stream} position dtype')
    return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype), shape


def draw_position_mask(data, stream, B, T, shape):
    "Draw a position mask: none, or bool with the positions' shape (`(T,)` or `(B, T)` when positions are absent)."
    if not data.draw(st.booleans(), label=f'{stream} has position mask'): return None
    if shape is None: shape = data.draw(st.sampled_from([(T,), (B, T)]), label=f'{stream} position mask shape')
    n = shape[0] * (shape[1] if len(shape) == 2 else 1)
    return torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)


def draw_attention_masks(data, g, B, H, Tq, Tk, is_causal):
    """Draw `attn_mask` and `key_padding_mask`, bool or float. Key 0 is never masked, so no row is fully masked
    (softmax over nothing is NaN). With `is_causal` the `attn_mask`, if any, is the causal mask itself: torch
    treats the flag as a promise about the mask."""
    kind = data.draw(st.sampled_from(['none', 'bool', 'float']), label='attn_mask kind')
    attn_mask = None
    if kind != 'none':
        shape = data.draw(st.sampled_from([(Tq, Tk), (B * H, Tq, Tk)]), label='attn_mask shape')
        if is_causal: blocked = causal_mask(Tq, Tk).expand(shape).clone()
        else:
            blocked = torch.rand(shape, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 0.7]), label='attn_mask density')
            blocked[..., 0] = False
        # A float mask adds finite biases too, except the causal one, which is exactly 0 / -inf.
        bias = torch.zeros(shape, dtype=DTYPE) if is_causal else torch.randn(shape, generator=g, dtype=DTYPE)
        attn_mask = blocked if kind == 'bool' else bias.masked_fill(blocked, float('-inf'))
    kpm_kind = data.draw(st.sampled_from(['none', 'bool', 'float']), label='key_padding_mask kind')
    key_padding_mask = None
    if kpm_kind != 'none':
        padded = torch.rand(B, Tk, generator=g) < 0.4
        padded[:, 0] = False
        key_padding_mask = padded if kpm_kind == 'bool' else torch.zeros(B, Tk, dtype=DTYPE).masked_fill(padded, float('-inf'))
    return attn_mask, key_padding_mask


@st.composite
def valid_cases(draw, square=False):
    "The sizes of a random valid call, and the seed of its weights and inputs; `square`: as many keys as queries."
    H = draw(st.sampled_from([1, 2, 4]), label='num_heads')
    D = H * draw(st.integers(1, 3), label='head_dim')
    B = draw(st.integers(1, 3), label='batch')
    Tq, Tk = draw(st.integers(0, 6), label='q_len'), draw(st.integers(1, 6), label='k_len')
    if square: Tq = Tk
    max_len = draw(st.integers(1, 10), label='max_len')
    seed = draw(st.integers(0, 2**31 - 1), label='seed')
    return dict(H=H, D=D, B=B, Tq=Tq, Tk=Tk, max_len=max_len, seed=seed)


def check_random_call(data, layer, reference, g, *, B, Tq, Tk, low, high):
    """Draw query and key inputs (from `g`), positions in `[low, high]`, position masks, attention masks, `is_causal`
    and `need_weights` for a cross-attention call of `layer`, and assert it equals `reference` (float64, 1e-12)."""
    D, H = layer.embed_dim, layer.num_heads
    query, key = torch.randn(B, Tq, D, generator=g, dtype=DTYPE), torch.randn(B, Tk, D, generator=g, dtype=DTYPE)
    q_positions, q_shape = draw_positions(data, 'q', B, Tq, low, high)
    k_positions, k_shape = draw_positions(data, 'k', B, Tk, low, high)
    kw = dict(q_positions=q_positions, k_positions=k_positions, q_position_mask=draw_position_mask(data, 'q', B, Tq, q_shape),
              k_position_mask=draw_position_mask(data, 'k', B, Tk, k_shape))
    is_causal = data.draw(st.booleans(), label='is_causal')
    attn_mask, key_padding_mask = draw_attention_masks(data, g, B, H, Tq, Tk, is_causal)
    need_weights = data.draw(st.booleans(), label='need_weights')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        out, weights = layer(query, key, key, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                             need_weights=need_weights, **kw)
        oracle_mask = causal_mask(Tq, Tk) if is_causal and attn_mask is None else attn_mask
        ref, ref_weights = reference(layer, query, key, key, attn_mask=oracle_mask, key_padding_mask=key_padding_mask,
                                     need_weights=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    if need_weights: torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12, equal_nan=True)
