"""The paths of a positional bias (issue 22), each against the mask path it replaces, in float64 to 1e-12, outputs and
every gradient (the table's included): torch's flash kernel and its backward (`_compat`) against the scores written
out, and attention in parts against one call (heads copied or read as views); the relative layer's band path (clipped
and T5's buckets, one table or one per head, every length around the band and the block, both layouts of the far keys,
causal and not: the far keys ahead a shift of their part's log-sum-exp), its dense and weights paths (a learned table
in training, too short for the band or without a causal mask); ALiBi's ramp path (the paper's slopes and any, zero and
negative ones, one block and several); the float32 rounding that bounds the ramp's blocks; the toeplitz path without a
causal mask (ALiBi, and the relative table in eval or frozen: a view of the bias of each offset, the keys reversed);
every reason `bias_path` gives, and the mask path kept for every mask and position argument; memory (no `T x T` tensor
saved on the band and toeplitz paths, no `(B, H, T, T)` on the dense path, the weights, two `(B, T, D)` at most, on the
weights path); flex_attention's `score_mod`s on the CPU (eval forward, eager) and on CUDA."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from additive_pos_attn import ALiBiMultiheadAttention, AdditiveRelMultiheadAttention
from additive_pos_attn._compat import _readable, _written_backward, _written_forward, flash_backward, flash_forward
from additive_pos_attn.alibi import ALIBI_FLOAT32_SPAN, alibi_parts, alibi_ramp_attention, alibi_reference
from additive_pos_attn import attention as attention_module
from additive_pos_attn.attention import (BAND_MIN_LENGTH, BIAS_PATH_MIN, HEADS_COPY_MIN, TOEPLITZ_MIN, BiasCall,
                                         FlashPart, attention_in_parts, choose_path, flex_bias_attention,
                                         offset_diagonals, project_heads, toeplitz_attention)
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.relative import (STAIRS_MAX, AheadPart, DensePart, band_attention, band_layout,
                                        relative_reference)
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


# --- torch's flash kernel, and attention in parts ---------------------------------------------------------------------

def test_the_kernel_gets_views_where_it_can_read_them():
    "`_readable`: no copy of a view of heads or rows (heads-last, sliced); a copy of a gradient expanded from a scalar."
    heads_last = torch.randn(2, 9, 3, 4).transpose(1, 2)
    for t in (heads_last, heads_last[:, 1:, 2:], torch.randn(2, 3, 9)[..., 4:], torch.randn(1, 3, 1, 4)):
        assert _readable(t) is t
    expanded = torch.ones(()).expand(2, 3, 9, 4)
    assert _readable(expanded) is not expanded and _readable(expanded).is_contiguous()


_LAYOUTS = {'dense': lambda t: t, 'heads last': lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
            'expanded': lambda t: t[:1, :1, :1, :1].expand(t.shape)}  # the gradient of `out.sum()`


@pytest.mark.parametrize('is_causal', [False, True])
@pytest.mark.parametrize('masked', [False, True], ids=['no mask', 'mask'])
@pytest.mark.parametrize('sizes', [(2, 3, 7, 7, 4), (1, 2, 5, 9, 8), (2, 1, 1, 1, 3)],
                         ids=['square', 'more keys', 'one'])
@pytest.mark.parametrize('layout', list(_LAYOUTS))
def test_flash_kernel_is_its_scores(is_causal, masked, sizes, layout):
    """Output, log-sum-exp and the backward's three gradients, against the scores written out (and autograd's),
    whatever the strides of the output's gradient (read by its strides where the kernel can, copied where not)."""
    B, H, Tq, Tk, d = sizes
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, Tq, d, generator=g, dtype=DTYPE, requires_grad=True)
    k, v = (torch.randn(B, H, Tk, d, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(2))
    mask = torch.randn(1, H, 1, Tk, generator=g, dtype=DTYPE) if masked else None
    kw = dict(is_causal=is_causal, attn_mask=mask, scale=0.3)
    with torch.no_grad(): out, lse = flash_forward(q, k, v, **kw)
    ref_out, ref_lse = _written_forward(q, k, v, **kw)
    close(out, ref_out); close(lse, ref_lse)
    grad = _LAYOUTS[layout](torch.randn(out.shape, generator=g, dtype=DTYPE))
    for a, b, c in zip(flash_backward(grad, q, k, v, out, lse, **kw),
                       _written_backward(grad, q, k, v, out, lse, **kw),
                       torch.autograd.grad(ref_out, (q, k, v), grad)):
        close(a, b); close(a, c)


@settings(max_examples=15, **SETTINGS)
@given(cuts=st.lists(st.integers(1, 29), max_size=3, unique=True), causal=st.booleans(), by_head=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_parts_are_one_call(cuts, causal, by_head, seed):
    """Any split of the queries into blocks, each block's keys split again (causal within the block's own keys), with
    a mask per key, is one call: output and every gradient; the heads views of a packed projection, in the same
    parts or (`by_head`) each head in parts of its own, cut elsewhere."""
    g = torch.Generator().manual_seed(seed)
    T = 30
    x = torch.randn(2, T, 3, 2, 4, generator=g, dtype=DTYPE, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    ramp = torch.randn(1, 2, 1, T, generator=g, dtype=DTYPE)

    def blocks(edges, heads):
        parts, m = [], ramp[:, heads]
        for s, e in zip(edges, edges[1:]):
            parts.append(FlashPart(slice(s, e), slice(s, e) if causal else slice(0, T), causal,
                                   m[..., s:e] if causal else m, heads))
            if causal and s: parts.append(FlashPart(slice(s, e), slice(0, s), mask=m[..., :s], heads=heads))
        return parts
    edges = [0, *sorted(cuts), T]
    parts = blocks(edges, slice(0, 1)) + blocks([0, 13, T], slice(1, 2)) if by_head else blocks(edges, slice(None))
    out = attention_in_parts(q, k, v, parts, scale=0.4)
    mask = ramp.expand(1, 2, T, T)
    if causal: mask = mask.masked_fill(causal_mask(T, T), float('-inf'))
    _same(out, nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4), (x,))


def test_parts_flush_subnormals_and_leave_the_flag_as_it_was():
    """Subnormal floats are flushed while the parts run (seen from inside a part), and the flag is back as it was
    after, either way; under a float64 default dtype too."""
    tiny, seen = torch.tensor([1e-39], dtype=torch.float32), []

    class Probe(FlashPart):
        def forward(self, *args):
            seen.append(bool((tiny * 1.0).item() == 0))
            return super().forward(*args)

    q = torch.randn(1, 1, 3, 2, dtype=DTYPE, requires_grad=True)
    if not torch.set_flush_denormal(False): pytest.skip('this CPU cannot flush subnormals')
    for before, default in ((False, torch.float32), (True, torch.float32), (True, torch.float64)):
        torch.set_flush_denormal(before)
        torch.set_default_dtype(default)
        try:
            attention_in_parts(q, q, q, [Probe(slice(None), slice(None), True)], scale=1.0).sum().backward()
            assert bool((tiny * 1.0).item() == 0) == before and seen[-1]
        finally: torch.set_flush_denormal(False); torch.set_default_dtype(torch.float32)


def test_one_list_of_parts_serves_calls_in_turn():
    """A part keeps nothing of a call (what its backward needs, the call keeps): one list of parts, the far keys
    ahead among them, serves two forwards before the first backward, every gradient its own call's."""
    T, g = 8, torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, -2.0], dtype=DTYPE, requires_grad=True)
    parts = [FlashPart(slice(0, 4), slice(0, 4)), FlashPart(slice(4, 8), slice(4, 8)),
             AheadPart(slice(0, 4), slice(4, 8))]
    bias = torch.zeros(2, T, T, dtype=DTYPE)
    bias[:, 4:, :4] = -math.inf  # the queries 4 to 7 see the keys 4 to 7; the queries 0 to 3 see all, 4 to 7 shifted
    calls = [tuple(torch.randn(1, 2, T, 4, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(3))
             for _ in range(2)]
    outs = [attention_in_parts(q, k, v, parts, scale=0.5, bias=(shift, shift)) for q, k, v in calls]
    for out, (q, k, v) in zip(outs, calls):
        shifted = bias.clone()
        shifted[:, :4, 4:] = shift[:, None, None]
        ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=shifted, scale=0.5)
        _same(out, ref, (q, k, v, shift))


def test_parts_refuse_rows_half_covered_and_rows_left_out():
    q = torch.randn(1, 2, 4, 2, dtype=DTYPE)
    for parts in ([FlashPart(slice(0, 2), slice(0, 2)), FlashPart(slice(0, 4), slice(2, 4))],
                  [FlashPart(slice(None), slice(None), heads=slice(0, 1)), FlashPart(slice(None), slice(None))]):
        with pytest.raises(ValueError, match='must all be new or all covered'):
            attention_in_parts(q, q, q, parts, scale=1.0)
    for parts in ([FlashPart(slice(0, 2), slice(0, 4))], [FlashPart(slice(None), slice(None), heads=slice(1, 2))]):
        with pytest.raises(ValueError, match='every query of every head'):
            attention_in_parts(q, q, q, parts, scale=1.0)


# --- the relative layer's band path -----------------------------------------------------------------------------------

def _rel_layer(seed=0, D=16, H=4, **options):
    "A float64 relative layer, every parameter moved (`randomise`)."
    torch.manual_seed(seed)
    return randomise(AdditiveRelMultiheadAttention(D, H, dtype=DTYPE, **options))


def _rel_path(layer, x, is_causal=True):
    return choose_path(layer.attn, need_weights=False, bias=BiasCall(
        'relative', x, x, x, is_causal, None, max(layer.band_reaches(is_causal)), layer.rel_bias.requires_grad)).name


def _check_band(layer, T, B=2, seed=0):
    """The layer's band path (`band_forward`), causal or not, gives the mask path's output and every gradient, eval
    alike; the layer takes it from `BIAS_PATH_MIN` times the reach (without a causal mask: its 'relative-bi' times the
    longer reach) and `BAND_MIN_LENGTH` keys on, and a learned table's dense or weights path below."""
    x = torch.randn(B, T, layer.embed_dim, dtype=DTYPE, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    learned = 'relative-dense' if layer.num_heads * T > 2 * layer.embed_dim else 'relative-weights'
    for is_causal in (True, False):
        reaches = layer.band_reaches(is_causal)
        key = 'relative' if is_causal else 'relative-bi'
        least = BIAS_PATH_MIN[key]['training']
        taken = T >= least * (reaches[0] if is_causal else max(reaches)) and T >= BAND_MIN_LENGTH[key]
        assert _rel_path(layer, x, is_causal) == ('relative-band' if taken else learned)
        mask = causal_mask(T, T) if is_causal else torch.zeros(T, T, dtype=torch.bool)
        ref = layer(x, x, x, attn_mask=mask)[0]  # a mask: the mask path (tests/test_relative.py)
        _same(layer.band_forward(x, is_causal=is_causal), ref, (x, *layer.parameters()))
        with torch.no_grad(): close(layer.band_forward(x, is_causal=is_causal), ref)
        _same(layer(x, x, x, is_causal=is_causal)[0], ref, (x, layer.rel_bias))  # the path the layer takes


@pytest.mark.parametrize('options', [dict(max_distance=3), dict(max_distance=5, per_head=False),
                                     dict(max_distance=40), dict(max_distance=4, bias=False),
                                     dict(max_distance=12, num_buckets=8, bidirectional=False),
                                     dict(max_distance=12, num_buckets=8), dict(max_distance=6, num_buckets=4)],
                         ids=['clipped', 'one column', 'wide band', 'no bias', 't5 decoder', 't5 encoder',
                              'few buckets'])
def test_band_path_is_the_mask_path(options):
    layer = _rel_layer(**options)
    reach = max(layer.band_reaches(False))
    for T in sorted({1, reach + 1, 65, 2 * max(reach, 64) + 7, 3 * 64 + reach, 6 * reach + 1,
                     BAND_MIN_LENGTH['relative-bi']}):  # the last: the layer's own path is the band, both ways
        _check_band(layer, T)


@settings(max_examples=24, **SETTINGS)
@given(m=st.integers(1, 20), extra=st.integers(1, 40), block=st.integers(2, 40), heads=st.sampled_from([1, 2, 4]),
       buckets=st.sampled_from([None, 4, 6, 9]), bidirectional=st.booleans(), stairs=st.booleans(),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_band_attention_is_the_mask_for_any_block(m, extra, block, heads, buckets, bidirectional, stairs, causal,
                                                  seed):
    """`band_attention` of random heads, any band, any block (shorter or longer than the band), any length past it,
    causal (the far keys in one causal call or in stairs) or not (the far keys ahead too, in stairs)."""
    g = torch.Generator().manual_seed(seed)
    side = None if buckets is None else buckets // (2 if bidirectional else 1) // 2  # T5's exact offsets
    options = {} if side is None or m <= side or side < 1 else dict(num_buckets=buckets, bidirectional=bidirectional)
    table = _rel_layer(seed, H=heads, max_distance=m, **options)
    rows = table.offset_rows()  # tied rows (buckets) are one table row: its gradient sums theirs
    behind, ahead = table.band_reaches(causal)
    T = max(behind, ahead) + extra
    q, k, v = (torch.randn(2, heads, T, 3, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(3))
    out = band_attention(q, k, v, rows, max_distance=m, reach=behind, scale=0.7, block=block, stairs=stairs,
                         ahead=None if causal else ahead)
    index = (torch.arange(T)[:, None] - torch.arange(T)).clamp(-m, m) + m
    mask = rows.T[:, index].masked_fill(causal_mask(T, T) if causal else torch.zeros(T, T, dtype=torch.bool), -math.inf)
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    _same(out, ref, (q, k, v, table.rel_bias))


@pytest.mark.parametrize('is_causal', [True, False])
def test_band_layout_past_the_stairs(is_causal):
    """Past `STAIRS_MAX` the layer's band takes one causal call for the far keys (and without a causal mask one on
    the sequence reversed for those ahead), with the heads copied (`HEADS_COPY_MIN`): output and every gradient as
    the mask path's; the stairs up to it."""
    assert band_layout(STAIRS_MAX, is_causal).stairs and not band_layout(STAIRS_MAX + 1, is_causal).stairs
    assert HEADS_COPY_MIN <= STAIRS_MAX + 1
    layer = _rel_layer(max_distance=20, H=2)
    x = torch.randn(1, STAIRS_MAX + 1, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert _rel_path(layer, x, is_causal) == 'relative-band'
    T = x.shape[1]
    ref = layer(x, x, x, attn_mask=causal_mask(T, T) if is_causal else torch.zeros(T, T, dtype=torch.bool))[0]
    _same(layer(x, x, x, is_causal=is_causal)[0], ref, (x, layer.rel_bias, layer.attn.in_proj_weight))


@pytest.mark.parametrize('copy', [False, True])
def test_parts_on_heads_as_views(copy):
    """Heads as views of a packed projection, copied to memory of their own or read as they are: the parts' output
    and every gradient as one masked call's, and an output whose heads merge by a view (the kernel's follows the
    queries' layout)."""
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(2, 21, 3, 3, 4, generator=g, dtype=DTYPE, requires_grad=True)  # (B, T, 3, H, d)
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    parts = [FlashPart(slice(None), slice(None), is_causal=True), FlashPart(slice(6, 21), slice(0, 6))]
    out = attention_in_parts(q, k, v, parts, scale=0.5, copy_heads=copy)
    assert out.transpose(1, 2).is_contiguous()
    twice = torch.zeros(21, 21, dtype=DTYPE)
    twice[6:, :6] = math.log(2)  # keys 0 to 5 counted twice for queries 6 on
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=twice.masked_fill(causal_mask(21, 21),
                                                                                         float('-inf')), scale=0.5)
    _same(out, ref, (packed,))


@pytest.mark.parametrize('options', [dict(max_distance=40), dict(max_distance=40, per_head=False),
                                     dict(max_distance=40, bias=False), dict(max_distance=40, num_buckets=32),
                                     dict(max_distance=40, num_buckets=64, bidirectional=False)],
                         ids=['clipped', 'one column', 'no bias', 't5 encoder', 't5 decoder'])
@pytest.mark.parametrize('is_causal', [True, False])
def test_learned_paths_are_the_mask_path(options, is_causal):
    """Within 1.5 times the band, or at any length without a causal mask, in training: the layer takes the dense path
    where the weights would be more than two `(B, T, D)`, and saves nothing of `T x T` floats, else the weights path,
    which saves the weights `(B, H, T, T)`, two units at most, and nothing else of `T x T` floats; both give the mask
    path's output and every gradient, the weights path its second derivative too; with the table frozen the mask
    path (the flash kernel then) stays."""
    layer = _rel_layer(**options)
    for T in (1, 2, 8, 9, 31, 45):
        x = torch.randn(3, T, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(T), requires_grad=True)
        dense = 4 * T > 2 * 16
        assert _rel_path(layer, x, is_causal) == ('relative-dense' if dense else 'relative-weights')
        mask = causal_mask(T, T) if is_causal else torch.zeros(T, T, dtype=torch.bool)
        ref = layer(x, x, x, attn_mask=mask)[0]
        forward = layer.dense_forward if dense else layer.weights_forward
        _same(forward(x, is_causal=is_causal), ref, (x, *layer.parameters()))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _same(layer(x, x, x, is_causal=is_causal)[0], ref, (x,))
        square = list({t.untyped_storage().data_ptr(): t.numel() for t in saved  # storages, each counted once
                       if t.is_floating_point() and t.shape[-2:] == (T, T)}.values())
        assert square == ([] if dense else [3 * 4 * T * T])  # the weights, two (B, T, D) at most, or nothing
        if not dense:  # plain operations: a second derivative as the mask path's
            firsts = [torch.autograd.grad(out.square().sum(), x, create_graph=True)[0]
                      for out in (layer(x, x, x, is_causal=is_causal)[0], ref)]
            second = [torch.autograd.grad(first.square().sum(), x)[0] for first in firsts]
            close(*second, eps=1e-12 * max(1.0, float(second[1].abs().max())))  # squares of squares: relative
    layer.rel_bias.requires_grad_(False)
    assert _rel_path(layer, x, is_causal) == 'fused'


@pytest.mark.parametrize('is_causal', [True, False])
@pytest.mark.parametrize('chunk', [1, 2 * 81, 3 * 81, 10 ** 6], ids=['a head', 'two heads', 'three, then one', 'all'])
def test_dense_backward_in_steps_of_heads(is_causal, chunk):
    """The dense part's backward a sample and `chunk // T²` heads at a time (`DENSE_CHUNK` by default), the table
    clipped and T5's: its output and every gradient, the table's included, as the masked kernel's."""
    for options in (dict(max_distance=5), dict(max_distance=12, num_buckets=8)):
        layer, T, g = _rel_layer(**options), 9, torch.Generator().manual_seed(chunk)
        q, k, v = (torch.randn(2, 4, T, 3, generator=g, dtype=DTYPE, requires_grad=True) for _ in range(3))
        rows, m = layer.offset_rows(), layer.max_distance
        out = attention_in_parts(q, k, v, [DensePart(m, is_causal, chunk)], scale=0.7, bias=rows)
        index = (torch.arange(T)[:, None] - torch.arange(T)).clamp(-m, m) + m
        mask = rows.T[:, index].masked_fill(causal_mask(T, T) if is_causal else torch.zeros(T, T, dtype=torch.bool),
                                            float('-inf'))
        ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
        _same(out, ref, (q, k, v, layer.rel_bias))


def test_band_path_saves_no_square_tensor():
    """With gradients, nothing of `T x T` elements (nor the band's scores) is saved for backward, the largest the band's
    bias `(H, L, behind + L)` whatever `T`; the mask path saves it."""
    layer = _rel_layer(max_distance=8)
    T = 800
    x = torch.randn(1, T, 16, dtype=DTYPE, requires_grad=True)
    def largest(**kw):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(x, x, x, **kw)
        return max(sizes)
    assert largest(is_causal=True) < T * T / 4 and largest() < T * T / 4  # causal, and not (the far keys ahead too)
    assert largest(attn_mask=causal_mask(T, T)) >= T * T


@pytest.mark.parametrize('far', [30.0, -30.0])
def test_band_path_when_the_far_keys_ahead_weigh_most_or_least(far):
    """Without a causal mask, the far-ahead row far above the others (its part's weight all of each row's it can
    see) or far below (next to none): output and every gradient as the mask path's."""
    layer = _rel_layer(max_distance=4)
    with torch.no_grad(): layer.rel_bias[0] = far  # the row of the offsets -4 and below
    _check_band(layer, 40)


# --- ALiBi's ramp path ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('options', [dict(), dict(bias=False), dict(slopes=[1.0, -0.5, 0.0, 2.0]),
                                     dict(slopes=[0.3] * 4)],
                         ids=['paper', 'no bias', 'any slopes', 'equal slopes'])
@pytest.mark.parametrize('T', [1, 2, 17, 64])
def test_ramp_path_is_the_mask_path(options, T):
    "One block and blocks of 1, 5 and 16 queries: output and every gradient."
    torch.manual_seed(0)
    layer = randomise(ALiBiMultiheadAttention(16, 4, dtype=DTYPE, **options))
    x = torch.randn(3, T, 16, dtype=DTYPE, requires_grad=True)
    ref = alibi_reference(layer, x, x, x, attn_mask=causal_mask(T, T))[0]
    _same(alibi_ramp_attention(layer.attn, x, layer.slopes), ref, (x, *layer.parameters()))
    q, k, v = project_heads(layer.attn, x, x, x)
    for block in (1, 5, 16):
        out = attention_in_parts(q, k, v, alibi_parts(layer.slopes, T, DTYPE, block=block), scale=0.5)
        out = nn.functional.linear(out.transpose(1, 2).reshape(x.shape), layer.attn.out_proj.weight,
                                   layer.attn.out_proj.bias)
        _same(out, ref, (x, *layer.parameters()))


def test_ramp_blocks_refuse_a_bad_block():
    for block, error in ((0, ValueError), (-3, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match='block must be'): alibi_parts(torch.ones(2), 8, DTYPE, block=block)


def test_ramp_float32_within_its_span():
    """Float32 takes, head by head, blocks of at most `2 ALIBI_FLOAT32_SPAN / m` queries (a power of two; one block
    where `m (T - 1) / 2` is within the span), and stays within 1e-5 of the float64 mask path, relative to the largest
    value, output and gradients (three blocks and a short one for the steepest head)."""
    torch.manual_seed(0)
    slopes = [2.0 ** -h for h in range(8)]  # the largest 1, the dispatch's largest in float32: blocks of 512
    layer = ALiBiMultiheadAttention(64, 8, dtype=DTYPE, slopes=slopes)
    single = ALiBiMultiheadAttention(64, 8, slopes=slopes)
    single.load_state_dict(layer.state_dict())
    T = int(2 * ALIBI_FLOAT32_SPAN) * 3 + 7  # three blocks and a short one
    assert [(p.heads, p.rows) for p in alibi_parts(single.slopes, T, torch.float32) if p.is_causal] == [
        (slice(0, 1), slice(s, min(T, s + 512))) for s in range(0, T, 512)] + [
        (slice(1, 2), slice(0, 1024)), (slice(1, 2), slice(1024, T)), (slice(2, 8), slice(0, T))]
    x = torch.randn(1, T, 64, dtype=DTYPE, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    assert _alibi_path(single, x32, 1.0) == 'alibi-ramp'
    ref = layer(x, x, x, attn_mask=causal_mask(T, T))[0]  # the mask path, float64
    out = single(x32, x32, x32, is_causal=True)[0]
    for a, b in zip((out, *_grads(out, (x32, single.attn.in_proj_weight))),
                    (ref, *_grads(ref, (x, layer.attn.in_proj_weight)))):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def _alibi_path(layer, x, reach, is_causal=True):
    return choose_path(layer.attn, need_weights=False, bias=BiasCall('alibi', x, x, x, is_causal, None, reach)).name


# --- the toeplitz path: a bias of the offset alone as a view ---------------------------------------------------------

TOEPLITZ_LAYERS = {'clipped': lambda: _rel_layer(max_distance=5),
                   'one column': lambda: _rel_layer(max_distance=3, per_head=False),
                   't5 encoder': lambda: _rel_layer(max_distance=12, num_buckets=8),
                   't5 decoder': lambda: _rel_layer(max_distance=12, num_buckets=8, bidirectional=False),
                   'no bias': lambda: _rel_layer(max_distance=40, bias=False),
                   'alibi': lambda: randomise(ALiBiMultiheadAttention(16, 4, dtype=DTYPE)),
                   'any slopes': lambda: randomise(ALiBiMultiheadAttention(16, 4, slopes=[1.0, -0.5, 0.0, 2.0],
                                                                           dtype=DTYPE))}


@pytest.mark.parametrize('name', TOEPLITZ_LAYERS)
@pytest.mark.parametrize('T', [TOEPLITZ_MIN, TOEPLITZ_MIN + 37])
def test_toeplitz_path_is_the_mask_path(name, T):
    """Without a causal mask, a bias that takes no gradient (ALiBi's; the relative table in eval, or frozen) takes the
    toeplitz path from `TOEPLITZ_MIN` on: output and every gradient of the input and of `attn` as the mask path's;
    a learned table in training does not, nor a causal call."""
    layer = TOEPLITZ_LAYERS[name]()
    x = torch.randn(2, T, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(T), requires_grad=True)
    ref = layer(x, x, x, attn_mask=torch.zeros(T, T, dtype=torch.bool))[0]  # a mask: the mask path
    with torch.no_grad():
        assert _any_path(layer, x, False) == 'toeplitz'
        close(layer(x, x, x)[0], ref, 1e-12)
    if isinstance(layer, AdditiveRelMultiheadAttention):
        assert _any_path(layer, x, False) in ('relative-dense', 'relative-band')  # a learned table in training
        layer.rel_bias.requires_grad_(False)
    assert _any_path(layer, x, False) == 'toeplitz' and _any_path(layer, x, True) != 'toeplitz'
    _same(layer(x, x, x)[0], ref, (x, *[p for p in layer.parameters() if p.requires_grad]))
    short = x[:, :TOEPLITZ_MIN - 1]
    assert _any_path(layer, short, False) != 'toeplitz'



@pytest.mark.parametrize('name', TOEPLITZ_LAYERS)
@pytest.mark.parametrize('q_len, k_len', [(TOEPLITZ_MIN, TOEPLITZ_MIN + 37), (TOEPLITZ_MIN + 37, TOEPLITZ_MIN)])
@pytest.mark.parametrize('values', ['the keys', 'apart'])
def test_toeplitz_path_in_cross_attention(name, q_len, k_len, values):
    """Cross-attention at the default positions with a bias that takes no gradient, either stream the longer, values
    the keys' memory or a memory of their own: the toeplitz path, output and every gradient (both memories' and
    `attn`'s) as the mask path's; a causal call, or a stream under `TOEPLITZ_MIN`, keeps the mask path."""
    layer = TOEPLITZ_LAYERS[name]()
    if isinstance(layer, AdditiveRelMultiheadAttention): layer.rel_bias.requires_grad_(False)
    g = torch.Generator().manual_seed(q_len)
    x, memory, other = (torch.randn(2, t, 16, dtype=DTYPE, generator=g, requires_grad=True)
                        for t in (q_len, k_len, k_len))
    value = memory if values == 'the keys' else other
    scheme = 'alibi' if isinstance(layer, ALiBiMultiheadAttention) else 'relative'
    def path(q, k, v, is_causal=False, given=None):
        return choose_path(layer.attn, need_weights=False, bias=BiasCall(scheme, q, k, v, is_causal, given, 1.0)).name
    assert path(x, memory, value) == 'toeplitz' and path(x, memory, value, is_causal=True) == 'fused'
    assert path(x, memory, value, given='key_padding_mask') == 'fused'
    short = slice(TOEPLITZ_MIN - 1)
    assert path(x[:, short], memory, value) == path(x, memory[:, short], value[:, short]) == 'fused'
    ref = layer(x, memory, value, attn_mask=torch.zeros(q_len, k_len, dtype=torch.bool))[0]  # the mask path
    _same(layer(x, memory, value)[0], ref, (x, memory, *[other] * (values == 'apart'),
                                           *[p for p in layer.parameters() if p.requires_grad]))
    if isinstance(layer, AdditiveRelMultiheadAttention):  # a table that learns, in eval: the path too
        layer.rel_bias.requires_grad_(True)
        with torch.no_grad():
            assert path(x, memory, value) == 'toeplitz'
            close(layer(x, memory, value)[0], ref, 1e-12)

def _any_path(layer, x, is_causal):
    "The path `choose_path` takes for either layer's self-attention call of `x`."
    if isinstance(layer, ALiBiMultiheadAttention):
        return _alibi_path(layer, x, float(layer.slopes.abs().max()), is_causal)
    return _rel_path(layer, x, is_causal)


@pytest.mark.parametrize('kind', ['relative', 'alibi'])
def test_toeplitz_path_in_float32(kind):
    """In float32 the toeplitz path is as close to float64 as the mask path (the same sums, the keys in another order),
    output and input gradient, and ALiBi's far keys, whose weights are subnormal or zero, cost nothing in accuracy."""
    torch.manual_seed(0)
    layer = (AdditiveRelMultiheadAttention(16, 4, max_distance=20) if kind == 'relative'
             else ALiBiMultiheadAttention(16, 4)).requires_grad_(False)  # a frozen table: the path in training too
    x = torch.randn(2, 600, 16)
    def call(dtype, **kw):
        y = x.to(dtype).requires_grad_()
        out = layer.to(dtype)(y, y, y, **kw)[0]
        return out.double(), torch.autograd.grad(out.sum(), y)[0].double()
    exact, masked = call(torch.float64), call(torch.float32, attn_mask=torch.zeros(600, 600, dtype=torch.bool))
    out = call(torch.float32)
    assert _any_path(layer, x.requires_grad_(), False) == 'toeplitz'
    for a, b, ref in zip(out, masked, exact): assert (a - ref).abs().max() <= 2 * (b - ref).abs().max() + 1e-7


def test_toeplitz_path_keeps_nothing_of_t_by_t(monkeypatch):
    """ALiBi without a causal mask, in training: the part's mask is a view of `H (2T - 1)` numbers, and nothing autograd
    saves for backward holds `T x T` elements; the mask path saves the bias."""
    layer = ALiBiMultiheadAttention(16, 4, dtype=DTYPE)
    T = 300
    x = torch.randn(1, T, 16, dtype=DTYPE, requires_grad=True)
    parts, in_parts = [], attention_module.attention_in_parts
    monkeypatch.setattr(attention_module, 'attention_in_parts',
                        lambda q, k, v, given, **kw: parts.extend(given) or in_parts(q, k, v, given, **kw))
    def largest(**kw):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            layer(x, x, x, **kw)
        return max(sizes) // x.element_size()
    assert largest() < T * T / 4
    assert [part.mask.untyped_storage().nbytes() for part in parts] == [4 * (2 * T - 1) * x.element_size()]
    assert largest(attn_mask=torch.zeros(T, T, dtype=torch.bool)) >= T * T


def test_toeplitz_attention_refuses_diagonals_that_learn():
    "The kernel gives its mask no gradient: diagonals that require one are refused, not silently dropped."
    layer = _rel_layer(max_distance=5)
    x = torch.randn(1, TOEPLITZ_MIN, 16, dtype=DTYPE)
    diagonals = offset_diagonals(layer.pair_bias, TOEPLITZ_MIN)
    assert diagonals.requires_grad
    with pytest.raises(ValueError, match='diagonals must take no gradient'):
        toeplitz_attention(layer.attn, x, diagonals)
    with torch.no_grad(): toeplitz_attention(layer.attn, x, diagonals)  # without gradients: nothing to drop
    with pytest.raises(ValueError, match='diagonals must hold the T_q [+] T_k - 1 = 511 offsets of 256 queries and 256 '
                                         'keys, got 509'):
        toeplitz_attention(layer.attn, x, diagonals.detach()[:, 1:-1])


# --- the dispatch: every reason, every mask ---------------------------------------------------------------------------

def _reasons():
    x, x32, long32 = torch.zeros(2, 50, 16, dtype=DTYPE), torch.zeros(2, 50, 16), torch.zeros(1, 300, 16)
    half = torch.zeros(2, 50, 16, dtype=torch.bfloat16)
    attn = lambda **kw: nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, **kw)  # noqa: E731
    call = BiasCall('relative', x, x, x, True, None, 8)
    other = torch.zeros_like(x)
    short, long = torch.zeros(2, 10, 16, dtype=DTYPE), torch.zeros(1, 1024, 16, dtype=DTYPE)
    shorter = torch.zeros(2, 8, 16, dtype=DTYPE)  # the weights (B, 4, 8, 8): two (B, 8, 16), no more
    alibi = call._replace(scheme='alibi', reach=0.2, query=long, key=long, value=long)
    toeplitz = torch.zeros(1, TOEPLITZ_MIN, 16, dtype=DTYPE)
    band = call._replace(query=long, key=long, value=long)
    return [(attn(), band, 'relative-band', 'far keys'), (attn(), alibi, 'alibi-ramp', 'a bias per key'),
            (attn(), call, 'fused', 'training with T < 1.5 times the band or 256 keys'),
            (attn(), call._replace(given='q_position_mask'), 'fused', 'q_position_mask given'),
            (attn(), call._replace(key=other, value=other), 'fused', 'not self-attention'),
            (attn(kdim=8, vdim=8), call, 'fused', 'apart'), (attn(add_bias_kv=True), call, 'fused', 'adds keys'),
            (attn(add_zero_attn=True), call, 'fused', 'adds keys'),
            (attn(dropout=0.1), call, 'fused', 'attention dropout'),
            (attn(), call._replace(scheme='alibi', reach=0.5, is_causal=False), 'fused',
             f'no causal mask (the penalty is not a bias per key then), T < {TOEPLITZ_MIN}'),
            (attn(), call._replace(is_causal=False, reach=9), 'fused', 'no causal mask, training with T < 6 times'),
            (attn(), band._replace(is_causal=False, reach=2, learned=True), 'relative-band', 'far keys on both sides'),
            (attn(), call._replace(is_causal=False, reach=2, query=toeplitz, key=toeplitz, value=toeplitz), 'toeplitz',
             'no causal mask, a bias of the offset alone without gradient'),
            (attn(), call._replace(scheme='alibi', reach=0.5, is_causal=False, query=toeplitz, key=toeplitz,
                                   value=toeplitz), 'toeplitz', 'the mask of the keys in reverse order'),
            (attn(), call._replace(query=half, key=half, value=half), 'fused', 'torch.bfloat16: the paths are for'),
            (attn(), call._replace(scheme='alibi', reach=1.0, query=long32, key=long32, value=long32), 'alibi-ramp',
             'ramp'),
            (attn(), call._replace(scheme='alibi', reach=10.0, query=long32, key=long32, value=long32), 'fused',
             'slope above 1'),
            (attn(), call._replace(scheme='alibi', reach=10.0, query=x32, key=x32, value=x32), 'fused', 'T < 256'),
            (attn(), call._replace(query=short, key=short, value=short, learned=True), 'relative-dense',
             'over 2 (B, T, D)'),
            (attn(), call._replace(query=short, key=short, value=short), 'fused', 'training with T < 1.5 times'),
            (attn(), call._replace(query=shorter, key=shorter, value=shorter, learned=True), 'relative-weights',
             '2 (B, T, D) at most'),
            (attn(), call._replace(is_causal=False, reach=9, learned=True), 'relative-dense', 'T < 6 times the band'),
            (attn(), call._replace(is_causal=False, query=shorter, key=shorter, value=shorter, learned=True),
             'relative-weights', 'the band path is slower there (measured); the weights are 2 (B, T, D) at most')]


@pytest.mark.parametrize('attn, call, name, reason', _reasons())
def test_bias_path_names_each_reason(attn, call, name, reason):
    path = choose_path(attn, need_weights=False, bias=call)
    assert path.name == name and reason in path.reason, path
    assert choose_path(attn, need_weights=True, bias=call).name == 'module'


def test_dropout_in_eval_and_a_lazy_reach():
    "Attention dropout counts in training only; the reach is asked for only where it decides; autocast keeps the mask."
    x, short = torch.zeros(2, 300, 16, dtype=DTYPE), torch.zeros(2, 50, 16, dtype=DTYPE)
    attn = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True, dtype=DTYPE).eval()
    asked = []
    reach = lambda: asked.append(1) or 8  # noqa: E731
    assert choose_path(attn, need_weights=False, bias=BiasCall('relative', x, x, x, True, None, reach)).name \
        == 'relative-band'
    assert choose_path(attn, need_weights=False, bias=BiasCall('alibi', short, short, short, False, None, reach)).name \
        == 'fused'
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


def test_flex_needs_triton(monkeypatch):
    """flex_attention's CUDA kernel is compiled by Triton (not in torch's Windows wheels): without it, or with a
    module that has no spec, no flex path."""
    import importlib.util
    real = importlib.util.find_spec
    for triton, expected in ((lambda: None, False), (lambda: real('math'), True), (None, False)):
        def find_spec(name, *rest, triton=triton):
            if name != 'triton': return real(name, *rest)
            if triton is None: raise ValueError('triton.__spec__ is None')
            return triton()
        monkeypatch.setattr(importlib.util, 'find_spec', find_spec)
        assert attention_module._flex_compilable() is expected
    monkeypatch.setattr(attention_module, 'FLEX_COMPILABLE', False)
    assert not attention_module.flex_available()


@pytest.mark.cuda
def test_cuda_without_triton_keeps_the_mask_path(monkeypatch):
    "On CUDA without Triton the layers keep the mask path, and the dispatch says why."
    layer = AdditiveRelMultiheadAttention(64, 4, max_distance=16, device='cuda')
    x = torch.randn(2, 100, 64, device='cuda')
    monkeypatch.setattr(attention_module, 'FLEX_COMPILABLE', False)
    path = choose_path(layer.attn, need_weights=False, bias=BiasCall('relative', x, x, x, True, None, 16.0))
    assert path.name == 'fused' and 'Triton' in path.reason
    close(layer(x, x, x, is_causal=True)[0], layer(x, x, x, attn_mask=causal_mask(100, 100, 'cuda'))[0], eps=1e-5)


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
