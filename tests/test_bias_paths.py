"""The paths of a positional bias (issue 22), each against the mask path it replaces, in float64 to 1e-12, outputs and
every gradient (the table's included): `attention_with_lse` against its scores written out; the relative layer's band
path (clipped and T5's buckets, one table or one per head, every length around the band and the block); ALiBi's
channel path (the paper's slopes and any, zero and negative ones); the float32 rounding that bounds the channel
path; every reason `bias_path` gives, and the mask path kept for every mask and position argument; memory (no
`T x T` tensor saved on the band path); flex_attention's `score_mod`s on the CPU (eval forward, eager) and on CUDA."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from additive_pos_attn import ALiBiMultiheadAttention, AdditiveRelMultiheadAttention
from additive_pos_attn._compat import _scores_with_lse, attention_with_lse
from additive_pos_attn.alibi import alibi_channel_attention, alibi_reference
from additive_pos_attn.attention import (ALIBI_FLOAT32_SPAN, RELATIVE_BAND_MIN, BiasCall, bias_path, choose_path,
                                         flex_bias_attention)
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.relative import band_attention, relative_reference
from cases import DTYPE, close, mask_kinds, position_kinds, randomise, stream
from strategies import SETTINGS


def _grads(out, inputs, seed=0):
    "The gradients of `out` against a fixed random cotangent, for `inputs`."
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(out.device, out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs, retain_graph=True)  # a shared table's graph serves both


def _same(out, ref, inputs, eps=1e-12):
    "Equal outputs and equal gradients of every input (absolute `eps`)."
    close(out, ref, eps)
    for a, b in zip(_grads(out, inputs), _grads(ref, inputs)): close(a, b, eps)


# --- attention_with_lse -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('is_causal', [False, True])
@pytest.mark.parametrize('sizes', [(2, 3, 7, 7, 4), (1, 2, 5, 9, 8), (2, 1, 1, 1, 3)],
                         ids=['square', 'more keys', 'one'])
def test_attention_with_lse_is_its_scores(is_causal, sizes):
    "Output, log-sum-exp, and the gradients of both together and of each alone, against the scores written out."
    B, H, Tq, Tk, d = sizes
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, Tq, d, generator=g, dtype=DTYPE, requires_grad=True)
    k, v = (torch.randn(B, H, Tk, d, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(2))
    out, lse = attention_with_lse(q, k, v, is_causal=is_causal, scale=0.3)
    ref_out, ref_lse = _scores_with_lse(q, k, v, is_causal, 0.3)
    close(out, ref_out); close(lse, ref_lse)
    for pick in (lambda o, l: o.sum() + (l * l).sum(), lambda o, l: (o * o).sum(), lambda o, l: l.sum() * 0.5):
        ours = torch.autograd.grad(pick(out, lse), (q, k, v), retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad(pick(ref_out, ref_lse), (q, k, v), retain_graph=True, allow_unused=True)
        for a, b in zip(ours, theirs): close(a, torch.zeros_like(a) if b is None else b)


def test_attention_with_lse_takes_strided_heads_and_falls_back():
    "Heads that are views of a packed projection, shifted slices of them, and half precision (the public fallback)."
    x = torch.randn(2, 9, 3, 2, 4, dtype=DTYPE, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    out, lse = attention_with_lse(q[:, :, 3:], k[:, :, :6], v[:, :, :6], is_causal=True)
    ref_out, ref_lse = _scores_with_lse(q[:, :, 3:], k[:, :, :6], v[:, :, :6], True, 0.5)
    close(out, ref_out); close(lse, ref_lse)
    close(torch.autograd.grad(out.sum() + lse.sum(), x)[0], torch.autograd.grad(ref_out.sum() + ref_lse.sum(), x)[0])
    half = attention_with_lse(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16())
    torch.testing.assert_close(half[0].double(), _scores_with_lse(q, k, v, False, 0.5)[0], rtol=0, atol=3e-2)


# --- the relative layer's band path -----------------------------------------------------------------------------------

def _rel_layer(seed=0, D=16, H=4, **options):
    "A float64 relative layer, every parameter moved (`randomise`)."
    torch.manual_seed(seed)
    return randomise(AdditiveRelMultiheadAttention(D, H, dtype=DTYPE, **options))


def _rel_path(layer, x, is_causal=True):
    return choose_path(layer.attn, need_weights=False, bias=BiasCall(
        'relative', x, x, x, is_causal, None, max(layer.band_reaches(is_causal)))).name


def _check_band(layer, T, is_causal, B=2, seed=0):
    """The layer's band path (`band_forward`) gives the mask path's output and every gradient, eval alike; the layer
    takes it from `RELATIVE_BAND_MIN` times the reach on."""
    x = torch.randn(B, T, layer.embed_dim, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    reach = max(layer.band_reaches(is_causal))
    taken = is_causal and T >= RELATIVE_BAND_MIN['training'] * reach  # not causal: measured slower, the mask kept
    assert (_rel_path(layer, x, is_causal) == 'relative-band') == taken
    out = layer.band_forward(x, is_causal)
    mask = causal_mask(T, T) if is_causal else torch.zeros(T, T, dtype=torch.bool)  # a mask: the mask path
    ref = layer(x, x, x, attn_mask=mask)[0]  # (tests/test_relative.py: the mask path is the definition)
    _same(out, ref, (x, *layer.parameters()))
    with torch.no_grad(): close(layer.band_forward(x, is_causal), ref)
    if taken: _same(layer(x, x, x, is_causal=is_causal)[0], ref, (x,))


@pytest.mark.parametrize('options', [dict(max_distance=3), dict(max_distance=5, per_head=False),
                                     dict(max_distance=40), dict(max_distance=4, bias=False),
                                     dict(max_distance=12, num_buckets=8, bidirectional=False),
                                     dict(max_distance=12, num_buckets=8), dict(max_distance=6, num_buckets=4)],
                         ids=['clipped', 'one column', 'wide band', 'no bias', 't5 decoder', 't5 encoder',
                              'few buckets'])
@pytest.mark.parametrize('is_causal', [True, False], ids=['causal', 'not causal'])
def test_band_path_is_the_mask_path(options, is_causal):
    layer = _rel_layer(**options)
    reach = max(layer.band_reaches(is_causal))
    for T in sorted({reach + 1, 65, 2 * max(reach, 32) + 7}):
        if T > reach: _check_band(layer, T, is_causal)


@settings(max_examples=12, **SETTINGS)
@given(m=st.integers(1, 20), extra=st.integers(1, 40), block=st.integers(2, 40), heads=st.sampled_from([1, 2, 4]),
       buckets=st.sampled_from([None, 4, 6, 9]), bidirectional=st.booleans(), causal=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_band_attention_is_the_mask_for_any_block(m, extra, block, heads, buckets, bidirectional, causal, seed):
    "`band_attention` of random heads, any band, any block (shorter or longer than the band), any length past it."
    g = torch.Generator().manual_seed(seed)
    side = None if buckets is None else buckets // (2 if bidirectional else 1) // 2  # T5's exact offsets
    options = {} if side is None or m <= side or side < 1 else dict(num_buckets=buckets, bidirectional=bidirectional)
    table = _rel_layer(seed, H=heads, max_distance=m, **options)
    rows = table.offset_rows()  # tied rows (buckets) are one table row: its gradient sums theirs
    behind, ahead = table.band_reaches(causal)
    T = max(behind, ahead) + extra
    q, k, v = (torch.randn(2, heads, T, 3, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(3))
    out = band_attention(q, k, v, rows, max_distance=m, reach=behind, scale=0.7, block=block, causal=causal,
                         reach_ahead=ahead)
    index = (torch.arange(T)[:, None] - torch.arange(T)).clamp(-m, m) + m
    mask = rows.T[:, index]
    if causal: mask = mask.masked_fill(causal_mask(T, T), float('-inf'))
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    _same(out, ref, (q, k, v, table.rel_bias))


def test_band_path_saves_no_square_tensor():
    "With gradients, nothing of `T x T` elements (nor the band's scores) is saved for backward; the mask path saves it."
    layer = _rel_layer(max_distance=8)
    T = 200
    x = torch.randn(1, T, 16, dtype=DTYPE, requires_grad=True)
    def largest(**kw):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(x, x, x, **kw)
        return max(sizes)
    assert largest(is_causal=True) < T * T / 4
    assert largest(attn_mask=causal_mask(T, T)) >= T * T


# --- ALiBi's channel path ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('options', [dict(), dict(bias=False), dict(slopes=[1.0, -0.5, 0.0, 2.0]),
                                     dict(slopes=[0.3] * 4)],
                         ids=['paper', 'no bias', 'any slopes', 'equal slopes'])
@pytest.mark.parametrize('T', [1, 2, 17, 64])
def test_channel_path_is_the_mask_path(options, T):
    torch.manual_seed(0)
    layer = randomise(ALiBiMultiheadAttention(16, 4, dtype=DTYPE, **options))
    x = torch.randn(3, T, 16, dtype=DTYPE, requires_grad=True)
    out = alibi_channel_attention(layer.attn, x, layer.slopes)
    ref = alibi_reference(layer, x, x, x, attn_mask=causal_mask(T, T))[0]
    _same(out, ref, (x, *layer.parameters()))


def test_channel_float32_within_its_span():
    """At the largest length `ALIBI_FLOAT32_SPAN` lets through (the largest slope 0.5), float32's channel path stays
    within 1e-5 of the float64 mask path, relative to the largest value, output and gradients; twice that length is the
    mask path's."""
    torch.manual_seed(0)
    layer = ALiBiMultiheadAttention(64, 8, dtype=DTYPE)
    single = ALiBiMultiheadAttention(64, 8)
    single.load_state_dict(layer.state_dict())
    T = int(2 * ALIBI_FLOAT32_SPAN / 0.5) + 1
    x = torch.randn(1, T, 64, dtype=DTYPE, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    longer = torch.zeros(1, T + 2, 64)
    with torch.no_grad():  # eval: the channel path from T = 512 on
        assert bias_path(single.attn, BiasCall('alibi', x32, x32, x32, True, None, 0.5)).name == 'alibi-channel'
        assert bias_path(single.attn, BiasCall('alibi', longer, longer, longer, True, None, 0.5)).name == 'fused'
    ref = layer(x, x, x, attn_mask=causal_mask(T, T))[0]  # the mask path, float64
    out = alibi_channel_attention(single.attn, x32, single.slopes)
    for a, b in zip((out, *_grads(out, (x32, single.attn.in_proj_weight))),
                    (ref, *_grads(ref, (x, layer.attn.in_proj_weight)))):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


# --- the dispatch: every reason, every mask ---------------------------------------------------------------------------

def _reasons():
    x, x32 = torch.zeros(2, 50, 16, dtype=DTYPE), torch.zeros(2, 50, 16)
    half = torch.zeros(2, 50, 16, dtype=torch.bfloat16)
    attn = lambda **kw: nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, **kw)  # noqa: E731
    call = BiasCall('relative', x, x, x, True, None, 8)
    other = torch.zeros_like(x)
    short, long = torch.zeros(2, 20, 16, dtype=DTYPE), torch.zeros(1, 1024, 16, dtype=DTYPE)
    alibi = call._replace(scheme='alibi', reach=0.2, query=long, key=long, value=long)
    return [(attn(), call, 'relative-band', 'far keys'), (attn(), alibi, 'alibi-channel', 'a bias per key'),
            (attn(), alibi._replace(query=x, key=x, value=x), 'fused', 'training with T < 1024'),
            (attn(), call._replace(given='q_position_mask'), 'fused', 'q_position_mask given'),
            (attn(), call._replace(key=other, value=other), 'fused', 'not self-attention'),
            (attn(kdim=8, vdim=8), call, 'fused', 'apart'), (attn(add_bias_kv=True), call, 'fused', 'adds keys'),
            (attn(add_zero_attn=True), call, 'fused', 'adds keys'),
            (attn(dropout=0.1), call, 'fused', 'attention dropout'),
            (attn(), call._replace(scheme='alibi', reach=0.5, is_causal=False), 'fused', 'no causal mask'),
            (attn(), call._replace(is_causal=False), 'fused', 'both sides is slower'),
            (attn(), call._replace(query=half, key=half, value=half), 'fused', 'torch.bfloat16'),
            (attn(), call._replace(scheme='alibi', reach=10.0, query=x32, key=x32, value=x32), 'fused', 'float32'),
            (attn(), call._replace(query=short, key=short, value=short), 'fused', 'training with T < 3 times')]


@pytest.mark.parametrize('attn, call, name, reason', _reasons())
def test_bias_path_names_each_reason(attn, call, name, reason):
    path = choose_path(attn, need_weights=False, bias=call)
    assert path.name == name and reason in path.reason, path
    assert choose_path(attn, need_weights=True, bias=call).name == 'module'


def test_dropout_in_eval_and_a_lazy_reach():
    "Attention dropout counts in training only; the reach is asked for only where it decides; autocast keeps the mask."
    x = torch.zeros(2, 50, 16, dtype=DTYPE)
    attn = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True, dtype=DTYPE).eval()
    asked = []
    reach = lambda: asked.append(1) or 8  # noqa: E731
    assert choose_path(attn, need_weights=False, bias=BiasCall('relative', x, x, x, True, None, reach)).name \
        == 'relative-band'
    assert choose_path(attn, need_weights=False, bias=BiasCall('alibi', x, x, x, False, None, reach)).name == 'fused'
    assert asked == [1]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        path = choose_path(attn, need_weights=False, bias=BiasCall('relative', x, x, x, True, None, reach))
    assert path.name == 'fused' and 'autocast' in path.reason


@pytest.mark.parametrize('kind', ['relative', 'alibi'])
def test_every_mask_and_position_keeps_the_mask_path(kind):
    """Under every mask torch accepts and every form of positions, with `is_causal` too, the layers give their
    references (the new paths are not taken; with `is_causal` alone and nothing else, they are)."""
    torch.manual_seed(0)
    layer = randomise(AdditiveRelMultiheadAttention(16, 4, max_distance=3, dtype=DTYPE) if kind == 'relative'
                      else ALiBiMultiheadAttention(16, 4, dtype=DTYPE))
    reference = relative_reference if kind == 'relative' else alibi_reference
    x = torch.randn(3, 9, 16, dtype=DTYPE, requires_grad=True)
    for name, kw in mask_kinds(3, 4, 9, 9, 'cpu').items():
        out = layer(x, x, x, is_causal=True, **kw)[0] if name == 'none' else layer(x, x, x, **kw)[0]
        ref_kw = dict(kw, attn_mask=causal_mask(9, 9)) if name == 'none' else kw
        _same(out, reference(layer, x, x, x, **ref_kw)[0], (x,))
    for positions in position_kinds(3, 9, 20, 'cpu')[1:]:
        kw = {**stream('q', positions), **stream('k', positions)}
        _same(layer(x, x, x, is_causal=True, **kw)[0], reference(layer, x, x, x, attn_mask=causal_mask(9, 9), **kw)[0],
              (x,))


# --- flex_attention ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['relative', 'relative-t5', 'alibi'])
@pytest.mark.parametrize('is_causal', [True, False])
def test_flex_score_mods_on_the_cpu(kind, is_causal):
    "Flex's eager form (no CPU backward in torch 2.13: eval forward only) with each layer's `score_mod`, float64."
    torch.manual_seed(0)
    layer = randomise({'relative': lambda: AdditiveRelMultiheadAttention(16, 4, max_distance=5, dtype=DTYPE),
                       'relative-t5': lambda: AdditiveRelMultiheadAttention(16, 4, max_distance=12, num_buckets=8,
                                                                            dtype=DTYPE),
                       'alibi': lambda: ALiBiMultiheadAttention(16, 4, dtype=DTYPE)}[kind]())
    reference = alibi_reference if kind == 'alibi' else relative_reference
    x = torch.randn(2, 30, 16, dtype=DTYPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the eager form warns that it is not compiled
        out = flex_bias_attention(layer.attn, x, layer.score_mod(), is_causal=is_causal, compiled=False)
        ref = reference(layer, x, x, x, attn_mask=causal_mask(30, 30) if is_causal else None)[0]
    close(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize('kind', ['relative', 'relative-t5', 'alibi'])
@pytest.mark.parametrize('is_causal', [True, False])
def test_flex_path_on_cuda(kind, is_causal):
    """On CUDA the layers take flex_attention (the dispatch says so), outputs and gradients (the table's included) as
    their mask path's, in float32."""
    torch.manual_seed(0)
    layer = {'relative': lambda: AdditiveRelMultiheadAttention(64, 4, max_distance=16, device='cuda'),
             'relative-t5': lambda: AdditiveRelMultiheadAttention(64, 4, max_distance=32, num_buckets=16,
                                                                  device='cuda'),
             'alibi': lambda: ALiBiMultiheadAttention(64, 4, device='cuda')}[kind]()
    randomise(layer)
    x = torch.randn(2, 100, 64, device='cuda', requires_grad=True)
    assert choose_path(layer.attn, need_weights=False, bias=BiasCall('alibi' if kind == 'alibi' else 'relative', x, x,
                                                                     x, is_causal, None, 1.0)).name == 'flex'
    out = layer(x, x, x, is_causal=is_causal)[0]
    mask = causal_mask(100, 100, 'cuda') if is_causal else torch.zeros(100, 100, device='cuda')
    ref = layer(x, x, x, attn_mask=mask)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(out, (x, *layer.parameters())), _grads(ref, (x, *layer.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
