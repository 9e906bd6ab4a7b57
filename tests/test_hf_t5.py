"""Parity with Hugging Face's T5 (`transformers`, the interop extra): `t5_bucket` is
`T5Attention._relative_position_bucket` at every offset from -4·max_distance to 4·max_distance; a bucketed
`AdditiveRelMultiheadAttention` holding a T5 table adds `T5Attention.compute_bias` to the last bit (float32 and
float64, both directions, three times max_distance, cross-attention and queries after cached tokens); and a whole
`T5Attention` ported into the layer (T5 does not scale its scores: `q` enters scaled by sqrt(d_kv)) gives its output
to 1e-5 in float32 (1e-12 in float64), encoder, causal decoder (decoding token by token with a cache too) and
cross-attention."""
import math

import pytest
import torch

transformers = pytest.importorskip('transformers', reason='parity with Hugging Face T5 needs transformers, the interop '
                                                          'extra: pip install -e ".[interop]"')
from transformers.models.t5.modeling_t5 import T5Attention, T5Config  # noqa: E402

from additive_pos_attn import AdditiveRelMultiheadAttention  # noqa: E402
from additive_pos_attn.positions import causal_mask, t5_bucket  # noqa: E402
from cases import T5_OPTIONS  # noqa: E402

# max_distance and T5's options: Hugging Face's defaults (32, 128), odd counts, the smallest valid ones, a max_distance
# next to the exact offsets, and edges where float32 and float64 disagree (18 and 9 buckets at 128)
DIRECTIONS = pytest.mark.parametrize('bidirectional', [True, False], ids=['encoder', 'decoder'])
D, H = 64, 4  # d_kv = 16: sqrt(d_kv) = 4 scales q exactly


@pytest.mark.parametrize('max_distance, num_buckets, bidirectional', T5_OPTIONS)
def test_buckets_are_hugging_faces_at_every_offset(max_distance, num_buckets, bidirectional):
    offsets = torch.arange(-4 * max_distance, 4 * max_distance + 1)
    ours = t5_bucket(offsets, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)
    theirs = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=num_buckets,
                                                   max_distance=max_distance)
    assert torch.equal(ours, theirs)


def _t5(bidirectional, *, num_buckets=32, max_distance=128, dtype=torch.float32, seed=0):
    "A `T5Attention` with its relative table (encoder: `bidirectional`; decoder: not), every weight random."
    config = T5Config(d_model=D, d_kv=D // H, num_heads=H, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=max_distance, is_decoder=not bidirectional, dropout_rate=0.0)
    config._attn_implementation = 'eager'  # T5's own attention, chosen as a model would choose it
    torch.manual_seed(seed)
    hf = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).to(dtype).eval()
    with torch.no_grad(): hf.relative_attention_bias.weight.normal_()
    return hf


def _ported(hf):
    "The layer holding `hf`'s weights: T5's projections have no biases, and its scores no division by sqrt(d_kv)."
    config, weight = hf.config, hf.q.weight
    layer = AdditiveRelMultiheadAttention(config.d_model, config.num_heads, bias=False, dtype=weight.dtype,
                                          max_distance=config.relative_attention_max_distance,
                                          num_buckets=config.relative_attention_num_buckets,
                                          bidirectional=not config.is_decoder)
    with torch.no_grad():
        layer.attn.in_proj_weight.copy_(torch.cat([hf.q.weight * math.sqrt(config.d_kv), hf.k.weight, hf.v.weight]))
        layer.attn.out_proj.weight.copy_(hf.o.weight)
        layer.rel_bias.copy_(hf.relative_attention_bias.weight)
    return layer.eval()


@DIRECTIONS
@pytest.mark.parametrize('num_buckets, max_distance, dtype', [(32, 128, torch.float32), (9, 20, torch.float64)])
def test_pair_bias_is_compute_bias(bidirectional, num_buckets, max_distance, dtype):
    """Self-attention at three times max_distance, cross-attention (queries and keys of other lengths), queries after
    cached tokens (`past_seen_tokens`), and shifted positions: the bias to the last bit."""
    hf = _t5(bidirectional, num_buckets=num_buckets, max_distance=max_distance, dtype=dtype)
    layer = _ported(hf)
    T = 3 * max_distance
    assert torch.equal(layer.pair_bias(None, None, q_len=T, k_len=T), hf.compute_bias(T, T)[0])
    assert torch.equal(layer.pair_bias(None, None, q_len=7, k_len=T), hf.compute_bias(7, T)[0])
    assert torch.equal(layer.pair_bias(None, None, q_len=T, k_len=5), hf.compute_bias(T, 5)[0])
    past = torch.arange(T - 4, T)
    assert torch.equal(layer.pair_bias(past, None, q_len=4, k_len=T), hf.compute_bias(4, T, past_seen_tokens=T - 4)[0])
    shifted = torch.arange(T) - 5000
    assert torch.equal(layer.pair_bias(shifted, shifted, q_len=T, k_len=T), hf.compute_bias(T, T)[0])


@DIRECTIONS
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_a_ported_t5_attention_is_hugging_faces(bidirectional, dtype, tol):
    """The whole attention at three times max_distance: the encoder's unmasked, the decoder's causal (T5's additive
    mask), to 1e-5 in float32 (1e-12 in float64); the decoder decoding token by token with a cache after a prompt,
    too."""
    hf = _t5(bidirectional, dtype=dtype)
    layer = _ported(hf)
    torch.manual_seed(1)
    x = torch.randn(2, 384, D, dtype=dtype)
    mask = torch.zeros(384, 384, dtype=dtype).masked_fill(causal_mask(384, 384), float('-inf'))  # T5's additive one
    with torch.no_grad():
        expected = hf(x, mask=None if bidirectional else mask[None, None])[0]
        out = layer(x, x, x, is_causal=not bidirectional)[0]
        torch.testing.assert_close(out, expected, rtol=0, atol=tol)
        if not bidirectional:
            cache = layer.init_cache(batch_size=2, max_length=384)
            steps = [layer(x[:, :300], x[:, :300], x[:, :300], cache=cache, is_causal=True)[0]]
            steps += [layer(t, t, t, cache=cache)[0] for t in x[:, 300:].split(1, dim=1)]
            torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=tol)


def test_a_ported_cross_attention_is_hugging_faces():
    "Queries attending to a memory of another length, with T5's bias of their offsets, as `key_value_states` gives it."
    hf = _t5(True)
    layer = _ported(hf)
    torch.manual_seed(2)
    x, memory = torch.randn(2, 50, D), torch.randn(2, 400, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, memory, memory)[0], hf(x, key_value_states=memory)[0], rtol=0, atol=1e-5)
