"""`AdditiveRelMultiheadAttention` exhaustively, on every device, in float64 to 1e-12: against its own `attn` with a zero
table, against `relative_reference` for every kind of positions (negative ones too), position masks and attention
masks, with and without weights; dropout alike on both paths; sequence-first inputs; gradients; refusals; and a
property test of random valid calls. The chapter keeps a few of each as examples."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.relative import relative_reference
from additive_pos_attn.testing import random_layer
from cases import DTYPE, check_is_its_attn, close, mask_kinds, position_kinds, stream
from strategies import SETTINGS, draw_attention_masks, draw_position_mask, draw_positions, valid_cases



def _layer(device, D=16, H=4, max_distance=3, seed=0, **kw):
    "A float64 layer whose table, biases and weights all differ from their initial values (`random_layer`)."
    return random_layer(D, H, kind='relative', max_len=max_distance + 1, seed=seed, device=device, **kw)


def _inputs(device, B=3, Tq=6, Tk=9, D=16):
    return (torch.randn(B, T, D, dtype=DTYPE, device=device) for T in (Tq, Tk))


def test_zero_table_is_the_wrapped_module(device):
    torch.manual_seed(0)
    check_is_its_attn(AdditiveRelMultiheadAttention(16, 4, max_distance=3, dtype=DTYPE, device=device), device)


@pytest.mark.parametrize('per_head', [True, False])
def test_every_kind_of_positions_matches_the_definition(device, per_head):
    layer = _layer(device, per_head=per_head)
    x, mem = _inputs(device)
    for kv in (x, mem):
        for qk in position_kinds(3, 6, 20, device, offset=-7):
            for kk in position_kinds(3, kv.shape[1], 20, device, offset=-3):
                kw = {**stream('q', qk), **stream('k', kk)}
                out, w = layer(x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                ref, ref_w = relative_reference(layer, x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                close(out, ref); close(w, ref_w)
                close(layer(x, kv, kv, **kw)[0], ref)  # the fused path, without weights


def test_every_mask_matches_the_definition(device):
    layer = _layer(device)
    x, mem = _inputs(device)
    positions = dict(q_positions=torch.tensor([4, -2, 0, 9, 1, 3], device=device), k_position_mask=torch.rand(9, device=device) < 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # torch's note on mixed bool and float masks, in the oracle
        for kw in mask_kinds(3, 4, 6, 9, device).values():
            ref = relative_reference(layer, x, mem, mem, **positions, **kw)[0]
            close(layer(x, mem, mem, **positions, **kw)[0], ref)
            close(layer(x, mem, mem, need_weights=True, **positions, **kw)[0], ref)
        causal = relative_reference(layer, x, mem, mem, attn_mask=causal_mask(6, 9, device), **positions)[0]
        close(layer(x, mem, mem, is_causal=True, **positions)[0], causal)
        close(layer(x, mem, mem, is_causal=True, need_weights=True, **positions)[0], causal)


def test_dropout_draws_alike_on_both_paths(device):
    layer = _layer(device, dropout=0.4).train()
    x, mem = _inputs(device)
    torch.manual_seed(1); fused = layer(x, mem, mem, is_causal=True)[0]
    torch.manual_seed(1); plain = layer(x, mem, mem, is_causal=True, need_weights=True)[0]
    close(fused, plain)


def test_sequence_first_is_the_batch_first_layer(device):
    layer = _layer(device)
    seq_first = AdditiveRelMultiheadAttention(16, 4, max_distance=3, dtype=DTYPE, device=device, batch_first=False)
    seq_first.load_state_dict(layer.state_dict())
    x, _ = _inputs(device)
    p = torch.randint(-5, 5, (3, 6), device=device)
    xt = x.transpose(0, 1).contiguous()
    close(seq_first(xt, xt, xt, q_positions=p, k_positions=p)[0].transpose(0, 1), layer(x, x, x, q_positions=p, k_positions=p)[0])


def test_gradcheck(device):
    layer = _layer(device, D=8, H=2, max_distance=2)
    x, mem = _inputs(device, B=2, Tq=3, Tk=4, D=8)
    qp, km = torch.tensor([5, -1, 2], device=device), torch.tensor([True, False, True, True], device=device)
    def f(q, k, v, table):
        return functional_call(layer, {**dict(layer.named_parameters()), 'rel_bias': table}, (q, k, v),
                               dict(q_positions=qp, k_position_mask=km, is_causal=True))[0]
    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (x, mem, mem, layer.rel_bias)])


def test_reset_parameters_and_refusals():
    layer = _layer('cpu')
    layer.reset_parameters()
    assert layer.rel_bias.abs().sum() == 0 and layer.attn.in_proj_bias.abs().sum() == 0
    cases = [(ValueError, r"max_distance must be a positive int, got 0", dict(max_distance=0)),
             (TypeError, r"max_distance must be an int, got float 2.0", dict(max_distance=2.0)),
             (TypeError, r"per_head must be a bool, got int 1", dict(max_distance=2, per_head=1)),
             (ValueError, r"embed_dim must be divisible by num_heads, got embed_dim=16, num_heads=3", dict(max_distance=2, num_heads=3))]
    for error, message, kw in cases:
        with pytest.raises(error, match=message): AdditiveRelMultiheadAttention(16, kw.pop('num_heads', 4), **kw)
    x, mem = _inputs('cpu')
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float64 \(or run under autocast\), got torch.float32"):
        layer(x.float(), mem.float(), mem.float())
    with pytest.raises(ValueError, match=r"k_positions must have shape \(9,\) or \(3, 9\), got \(6,\)"):
        layer(x, mem, mem, k_positions=torch.zeros(6, dtype=torch.long))


@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_random_valid_calls_match_the_definition(data):
    "Random sizes, any integer positions (shared or per sample), position masks, attention masks, flags and layouts."
    sizes = data.draw(valid_cases())
    H, D, B, Tq, Tk, seed = (sizes[k] for k in ('H', 'D', 'B', 'Tq', 'Tk', 'seed'))
    layer = _layer('cpu', D=D, H=H, max_distance=data.draw(st.integers(1, 4), label='max_distance'), seed=seed,
                   per_head=data.draw(st.booleans(), label='per_head'))
    g = torch.Generator().manual_seed(seed)
    query, key = torch.randn(B, Tq, D, generator=g, dtype=DTYPE), torch.randn(B, Tk, D, generator=g, dtype=DTYPE)
    q_positions, q_shape = draw_positions(data, 'q', B, Tq, -10, 10)
    k_positions, k_shape = draw_positions(data, 'k', B, Tk, -10, 10)
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
        ref, ref_weights = relative_reference(layer, query, key, key, attn_mask=oracle_mask, key_padding_mask=key_padding_mask,
                                              need_weights=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    if need_weights: torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12, equal_nan=True)
