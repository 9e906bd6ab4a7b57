"""`AdditiveRelMultiheadAttention` exhaustively, on every device, in float64 to 1e-12: against its own `attn` with a zero
table, against `relative_reference` for every kind of positions (negative ones too), position masks and attention
masks, with and without weights; dropout alike on both paths; sequence-first inputs; gradients; refusals; and a
property test of random valid calls. The same for T5's buckets (`num_buckets`, both directions, offsets far past
`max_distance`), with decoding, conversion, the state dict and the buffer of the offsets' buckets. The chapter keeps a
few of each as examples."""
import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.relative import relative_reference, t5_bucket_reference
from additive_pos_attn.testing import random_layer
from cases import DTYPE, check_is_its_attn, close, mask_kinds, position_kinds, randomise, stream
from strategies import SETTINGS, check_random_call, valid_cases



def _layer(device, D=16, H=4, max_distance=3, seed=0, **kw):
    "A float64 layer whose table, biases and weights all differ from their initial values (`random_layer`)."
    return random_layer(D, H, kind='relative', max_len=max_distance + 1, seed=seed, device=device, **kw)


# T5's options of the bucketed layers under test: few buckets and a short max_distance, so that positions spread
# over 20 reach offsets past it on both sides; 9 buckets (odd) in the decoder's direction
T5 = {'encoder': dict(max_distance=6, num_buckets=10, bidirectional=True),
      'decoder': dict(max_distance=5, num_buckets=9, bidirectional=False)}
DIRECTIONS = pytest.mark.parametrize('t5', T5.values(), ids=T5.keys())


def _t5_layer(device, t5, D=16, H=4, seed=0, **kw):
    "A float64 bucketed layer, every parameter moved off its initial value (`randomise`)."
    torch.manual_seed(seed)
    return randomise(AdditiveRelMultiheadAttention(D, H, dtype=DTYPE, device=device, **t5, **kw))


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


@DIRECTIONS
def test_every_kind_of_positions_matches_the_definition_with_buckets(device, t5):
    """Each form of the query's positions with one of the key's (the clipped layer above meets every pair of forms),
    per-head and shared tables, offsets up to 26 against a max_distance of 5 or 6."""
    x, mem = _inputs(device)
    for per_head in (True, False):
        layer = _t5_layer(device, t5, per_head=per_head)
        for kv in (x, mem):
            kinds = zip(position_kinds(3, 6, 20, device, offset=-7), position_kinds(3, kv.shape[1], 20, device, offset=-3)[::-1])
            for qk, kk in kinds:
                kw = {**stream('q', qk), **stream('k', kk)}
                out, w = layer(x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                ref, ref_w = relative_reference(layer, x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                close(out, ref); close(w, ref_w)
                close(layer(x, kv, kv, **kw)[0], ref)


@pytest.mark.parametrize('t5', [None, *T5.values()], ids=['clipped', *T5.keys()])
def test_every_mask_matches_the_definition(device, t5):
    layer = _layer(device) if t5 is None else _t5_layer(device, t5)
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
    per_head, num_buckets = data.draw(st.booleans(), label='per_head'), data.draw(st.sampled_from([None, 4, 5, 8]), label='num_buckets')
    if num_buckets is None:
        layer = _layer('cpu', D=D, H=H, max_distance=data.draw(st.integers(1, 4), label='max_distance'), seed=seed, per_head=per_head)
    else:
        bidirectional = data.draw(st.booleans(), label='bidirectional')
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        t5 = dict(num_buckets=num_buckets, bidirectional=bidirectional,
                  max_distance=data.draw(st.integers(exact + 1, exact + 6), label='max_distance'))
        layer = _t5_layer('cpu', t5, D=D, H=H, seed=seed, per_head=per_head)
    g = torch.Generator().manual_seed(seed)
    check_random_call(data, layer, relative_reference, g, B=B, Tq=Tq, Tk=Tk, low=-10, high=10)


def test_a_zero_bucketed_table_is_the_wrapped_module(device):
    torch.manual_seed(0)
    check_is_its_attn(AdditiveRelMultiheadAttention(16, 4, **T5['encoder'], dtype=DTYPE, device=device), device)


@DIRECTIONS
def test_buckets_are_t5s_of_every_offset(t5):
    """The table has a row per bucket, the buffer holds the bucket of each clipped offset (T5's offset: key minus
    query), and the bias of any two positions, however far apart, is the row of their bucket."""
    layer = _t5_layer('cpu', t5)
    m, options = t5['max_distance'], dict(num_buckets=t5['num_buckets'], bidirectional=t5['bidirectional'])
    assert layer.rel_bias.shape == (t5['num_buckets'], 4) and (layer.num_buckets, layer.bidirectional) == tuple(options.values())
    assert layer.offset_buckets.tolist() == [t5_bucket_reference(-d, max_distance=m, **options) for d in range(-m, m + 1)]
    p = torch.arange(-40, 41, 3)
    bias = layer.pair_bias(p, p, q_len=len(p), k_len=len(p))
    rows = [[t5_bucket_reference(int(k - q), max_distance=m, **options) for k in p] for q in p]
    assert torch.equal(bias, layer.rel_bias[torch.tensor(rows)].permute(2, 0, 1))


@pytest.mark.filterwarnings('ignore:Support for mismatched key_padding_mask:UserWarning')  # torch's note, in the oracle
@DIRECTIONS
@pytest.mark.parametrize('sizes', [(5, 1, 1, 1, 1, 1), (4, 3, 2, 1), (10,)], ids=['token by token', 'in chunks', 'in one call'])
def test_bucketed_decoding_is_recomputing(device, t5, sizes):
    """Decoding with a cache from time stamps of each sample that step by 3 (offsets up to 27, past max_distance), a
    position mask and left padding, gives the layer and the oracle on the whole sequence, causally."""
    layer = _t5_layer(device, t5).eval()
    x = torch.randn(3, 10, 16, dtype=DTYPE, device=device)
    stamps = torch.arange(-30, 0, 3, device=device) + torch.tensor([0, 5, -7], device=device)[:, None]  # per sample
    mask = torch.rand(3, 10, device=device) < 0.8
    kpm = torch.arange(10, device=device) < torch.tensor([0, 2, 3], device=device)[:, None]
    whole = dict(q_positions=stamps, k_positions=stamps, q_position_mask=mask, k_position_mask=mask, key_padding_mask=kpm)
    expected = layer(x, x, x, is_causal=True, **whole)[0]
    reference = relative_reference(layer, x, x, x, attn_mask=causal_mask(10, 10, device), **whole)[0]
    close(expected[~kpm], reference[~kpm])  # a padding query of a left-padded sample sees no key: no output to compare
    cache, outs, start = layer.init_cache(batch_size=3, max_length=10), [], 0
    for n in sizes:
        part, end = x[:, start:start + n], start + n
        outs.append(layer(part, part, part, cache=cache, is_causal=True, k_positions=stamps[:, start:end],
                          k_position_mask=mask[:, start:end], key_padding_mask=kpm[:, start:end])[0])
        start = end
    decoded = torch.cat(outs, dim=1)
    close(decoded[~kpm], expected[~kpm])


@DIRECTIONS
def test_conversion_state_dict_and_copies_keep_the_buckets(device, t5):
    """`from_mha` with buckets is the wrapped module until the table learns; the state dict holds the table and not the
    buffer, and loads into a fresh bucketed layer; deepcopy, torch.save and `.to(dtype)` keep the buckets (int64)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, device=device)
    layer = AdditiveRelMultiheadAttention.from_mha(mha, **t5)
    x, mem = _inputs(device)
    close(layer(x, mem, mem)[0], mha(x, mem, mem)[0])
    converted = AdditiveRelMultiheadAttention.convert(nn.Sequential(copy.deepcopy(mha)), **t5)[0]
    assert converted.num_buckets == t5['num_buckets'] and converted.bidirectional is t5['bidirectional']
    with torch.no_grad(): layer.rel_bias.normal_()
    kw = dict(q_positions=torch.arange(0, 60, 10, device=device), k_positions=torch.arange(9, device=device))
    expected = layer(x, mem, mem, **kw)[0]
    assert list(layer.state_dict()) == ['rel_bias', 'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias']
    fresh = AdditiveRelMultiheadAttention(16, 4, **t5, dtype=DTYPE, device=device)
    fresh.load_state_dict(layer.state_dict())
    buffer = io.BytesIO(); torch.save(layer, buffer); buffer.seek(0)
    for other in (fresh, copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        close(other(x, mem, mem, **kw)[0], expected)
    single = copy.deepcopy(layer).to(torch.float32)
    assert single.offset_buckets.dtype == torch.int64 and torch.equal(single.offset_buckets, layer.offset_buckets)
    close(single(x.float(), mem.float(), mem.float(), **kw)[0].double(), expected, eps=1e-5)


def test_meta_layers_get_their_buckets_back_with_reset_parameters():
    "Built on the meta device and moved with `to_empty`, the buffer is uninitialised: `reset_parameters` computes it."
    layer = AdditiveRelMultiheadAttention(16, 4, **T5['decoder'], device='meta')
    assert layer.offset_buckets.is_meta and layer.rel_bias.is_meta
    layer = layer.to_empty(device='cpu')
    layer.reset_parameters()
    assert torch.equal(layer.offset_buckets, AdditiveRelMultiheadAttention(16, 4, **T5['decoder']).offset_buckets)
    assert layer.rel_bias.abs().sum() == 0


@DIRECTIONS
def test_bucketed_gradcheck(t5):
    "Offsets that share a bucket add their gradients into its row."
    layer = _t5_layer('cpu', t5, D=8, H=2)
    x, mem = _inputs('cpu', B=2, Tq=3, Tk=5, D=8)
    qp, kp = torch.tensor([9, -1, 2]), torch.tensor([0, 1, 2, 20, -20])
    def f(q, k, v, table):
        return functional_call(layer, {**dict(layer.named_parameters()), 'rel_bias': table}, (q, k, v),
                               dict(q_positions=qp, k_positions=kp))[0]
    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (x, mem, mem, layer.rel_bias)])


def test_bucket_options_and_refusals():
    "Buckets in `extra_repr`; every bad option refused by name; `bidirectional` without buckets refused, not ignored."
    layer = AdditiveRelMultiheadAttention(16, 4, max_distance=128, num_buckets=32, bidirectional=False, per_head=False)
    assert repr(layer).splitlines()[1] == "  embed_dim=16, num_heads=4, max_distance=128, num_buckets=32, bidirectional=False, per_head=False"
    assert layer.rel_bias.shape == (32,) and layer.bidirectional is False
    clipped = AdditiveRelMultiheadAttention(16, 4, max_distance=3)
    assert (clipped.num_buckets, clipped.bidirectional, clipped.offset_buckets) == (None, None, None)
    assert not clipped._buffers and 'num_buckets' not in repr(clipped)  # as before buckets came
    cases = [(TypeError, r"num_buckets must be an int, got float 32.0", dict(num_buckets=32.0)),
             (TypeError, r"num_buckets must be an int, got bool True", dict(num_buckets=True)),
             (ValueError, r"num_buckets must be a positive int, got -2", dict(num_buckets=-2)),
             (ValueError, r"num_buckets must be at least 4 with bidirectional=True", dict(num_buckets=2)),
             (ValueError, r"num_buckets must be at least 2 with bidirectional=False", dict(num_buckets=1, bidirectional=False)),
             (TypeError, r"bidirectional must be a bool, got str 'yes'", dict(num_buckets=32, bidirectional='yes')),
             (ValueError, r"max_distance must exceed the 8 exact offsets of num_buckets=32 with bidirectional=True, got 8",
              dict(num_buckets=32, max_distance=8)),
             (ValueError, r"bidirectional applies to T5's buckets only: give num_buckets too, or leave bidirectional out; "
                          r"got bidirectional=True with num_buckets=None", dict(bidirectional=True)),
             (TypeError, r"max_distance must be an int, got NoneType None", dict(num_buckets=32, max_distance=None))]
    for error, message, kw in cases:
        with pytest.raises(error, match=message): AdditiveRelMultiheadAttention(16, 4, **{'max_distance': 128, **kw})
