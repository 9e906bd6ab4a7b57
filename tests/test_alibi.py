"""`ALiBiMultiheadAttention` exhaustively, on every device, in float64 to 1e-12: with zero slopes against its own `attn`;
against `alibi_reference` for every kind of positions (negative and huge ones too), position masks and attention masks,
with and without weights, self- and cross-attention, sequence-first, unbatched and nested inputs, torch's extra keys and
other key and value widths; dropout alike on both paths; the paper's slopes for 1 to 16 heads against a hand formula;
slopes given, checked by name; the slopes a buffer (saved, moved, never given a gradient); decoding with a cache as
recomputing; conversion; gradients; and a property test of random valid calls. Hugging Face's BLOOM slopes are checked
in `tests/test_alibi_interop.py`. The chapter keeps a few of each as examples."""
import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from additive_pos_attn.alibi import ALiBiMultiheadAttention, alibi_bias, alibi_reference, alibi_slopes, check_slopes
from additive_pos_attn.positions import causal_mask, padded_positions
from cases import DTYPE, check_is_its_attn, close, lm, mask_kinds, position_kinds, randomise, stream
from strategies import SETTINGS, check_random_call, valid_cases


def _layer(device, D=16, H=4, seed=0, **kw):
    "A float64 layer, every parameter moved off its initial value (`randomise`); the paper's slopes unless given."
    torch.manual_seed(seed)
    return randomise(ALiBiMultiheadAttention(D, H, dtype=DTYPE, device=device, **kw))


def _inputs(device, B=3, Tq=6, Tk=9, D=16):
    return (torch.randn(B, T, D, dtype=DTYPE, device=device) for T in (Tq, Tk))


def _paper_slopes(n):
    "The slopes of the paper's code (Press et al., `get_slopes`), written as it writes them: a hand oracle."
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer(): return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][:n - closest]


# ---------------------------------------------------------------------------------------------------------------------
# The slopes

@pytest.mark.parametrize('H', range(1, 17))
def test_the_paper_slopes_for_every_number_of_heads(H):
    "1 to 16 heads, powers of two and not: the paper's code to 1e-14 (its products round), and the closed form where H is a power of two."
    slopes = alibi_slopes(H, dtype=torch.float64)
    assert slopes.shape == (H,) and alibi_slopes(H).dtype == torch.float32
    torch.testing.assert_close(slopes, torch.tensor(_paper_slopes(H), dtype=DTYPE), rtol=1e-14, atol=0)
    if H & (H - 1) == 0: assert slopes.tolist() == [2 ** (-8 * (h + 1) / H) for h in range(H)]
    assert len(set(slopes.tolist())) == H and (slopes > 0).all() and (slopes < 1).all()


def test_slopes_of_heads_not_a_power_of_two_by_hand():
    "3 heads: the 2 of two heads, 2^-4 and 2^-8, then the first of four, 2^-2; 12: the 8 of eight, then 1st, 3rd, 5th, 7th of 16."
    assert alibi_slopes(3, dtype=DTYPE).tolist() == [2 ** -4, 2 ** -8, 2 ** -2]
    assert alibi_slopes(12, dtype=DTYPE).tolist() == [2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"): alibi_slopes(0)


def test_bad_slopes_are_refused_by_name():
    cases = [(TypeError, r"slopes must be a Tensor or a sequence of 4 numbers, got float", 0.5),
             (TypeError, r"slopes must be a Tensor or a sequence of 4 numbers, got str", 'paper'),
             (TypeError, r"slopes must hold real numbers, got \['float', 'str', 'float', 'float'\]", [0.5, 'a', 0.1, 0.2]),
             (TypeError, r"slopes must hold real numbers, got \['bool', 'bool', 'bool', 'bool'\]", [True] * 4),
             (TypeError, r"slopes must be a real Tensor, got dtype torch.complex64", torch.ones(4, dtype=torch.complex64)),
             (TypeError, r"slopes must be a real Tensor, got dtype torch.bool", torch.ones(4, dtype=torch.bool)),
             (ValueError, r"slopes must have shape \(num_heads,\) = \(4,\), got \(3,\)", [0.5, 0.25, 0.125]),
             (ValueError, r"slopes must have shape \(num_heads,\) = \(4,\), got \(1, 4\)", torch.ones(1, 4)),
             (ValueError, r"slopes must have shape \(num_heads,\) = \(4,\), got \(\)", torch.tensor(0.5)),
             (ValueError, r"slopes must be finite, got \[0.5, nan, 0.1, 0.2\]", [0.5, float('nan'), 0.1, 0.2]),
             (ValueError, r"slopes must be finite, got \[-inf, 1.0, 1.0, 1.0\]", torch.tensor([-float('inf'), 1.0, 1.0, 1.0]))]
    for error, message, slopes in cases:
        with pytest.raises(error, match=message): ALiBiMultiheadAttention(16, 4, slopes=slopes)
        with pytest.raises(error, match=message): check_slopes(slopes, 4)


def test_given_slopes_are_copied_into_a_buffer_without_gradient(device):
    "A tensor that requires a gradient, integers, a tuple: copied, float32 (float64 for a float64 layer), on the layer's device."
    given = torch.tensor([1.0, 0.5, 0.0, -0.25], requires_grad=True)
    layer = ALiBiMultiheadAttention(16, 4, slopes=given, device=device)
    assert layer.slopes.dtype == torch.float32 and layer.slopes.device.type == torch.device(device).type
    assert not layer.slopes.requires_grad and layer.slopes.tolist() == [1.0, 0.5, 0.0, -0.25]
    with torch.no_grad(): given.zero_()
    assert layer.slopes.tolist() == [1.0, 0.5, 0.0, -0.25]  # a copy
    assert ALiBiMultiheadAttention(16, 4, slopes=(1, 2, 3, 4), dtype=DTYPE).slopes.dtype == DTYPE
    assert ALiBiMultiheadAttention(16, 4, slopes=torch.arange(4), dtype=torch.float16).slopes.dtype == torch.float32
    assert 'slopes' not in dict(layer.named_parameters()) and dict(layer.named_buffers())['slopes'] is layer.slopes


# ---------------------------------------------------------------------------------------------------------------------
# The definition

def test_zero_slopes_is_the_wrapped_module(device):
    torch.manual_seed(0)
    check_is_its_attn(ALiBiMultiheadAttention(16, 4, slopes=torch.zeros(4), dtype=DTYPE, device=device), device)


def test_the_bias_by_hand():
    "Every pair's -m_h |p_q - p_k|, per sample where positions are, zero where a mask is False, from positions of any dtype."
    slopes = torch.tensor([1.0, 0.125], dtype=DTYPE)
    q, k = torch.tensor([[3, -2], [0, 100]], dtype=torch.int16), torch.tensor([1, 5, -7], dtype=torch.int8)
    q_mask, k_mask = torch.tensor([[True, True], [False, True]]), torch.tensor([True, True, False])
    bias = alibi_bias(slopes, q, k, q_mask, k_mask, q_len=2, k_len=3)
    expected = torch.zeros(2, 2, 2, 3, dtype=DTYPE)
    for b in range(2):
        for h in range(2):
            for i in range(2):
                for j in range(3):
                    if q_mask[b, i] and k_mask[j]: expected[b, h, i, j] = -slopes[h] * abs(int(q[b, i]) - int(k[j]))
    assert torch.equal(bias, expected)
    assert alibi_bias(slopes, None, None, q_len=2, k_len=3).shape == (2, 2, 3)  # shared: no batch dimension
    assert alibi_bias(slopes.half(), None, None, q_len=1, k_len=1).dtype == torch.float32  # at least float32



@pytest.mark.parametrize('dtype', [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize('q_len, k_len', [(1, 1), (1, 7), (7, 1), (5, 12), (12, 5), (300, 300)])
def test_default_positions_are_the_positions_written_out(dtype, q_len, k_len):
    """The default positions' bias (each offset's penalty, in windows) is, bit for bit, the bias of `arange` positions,
    whichever stream is longer and whatever the slopes' dtype, masks too."""
    slopes = alibi_slopes(4, dtype=dtype) * 3
    k_mask = torch.arange(k_len) % 3 > 0
    for mask in (None, k_mask):
        assert torch.equal(alibi_bias(slopes, None, None, k_mask=mask, q_len=q_len, k_len=k_len),
                           alibi_bias(slopes, torch.arange(q_len), torch.arange(k_len), k_mask=mask, q_len=q_len,
                                      k_len=k_len))

def test_huge_positions_are_exact():
    "Distances are taken in integers: positions around 2^40 give the bias of their offsets, exactly, as the default positions do."
    slopes = alibi_slopes(4, dtype=DTYPE)
    p = torch.tensor([0, 3, 7, 1000]) + 2 ** 40
    assert torch.equal(alibi_bias(slopes, p, p, q_len=4, k_len=4), alibi_bias(slopes, p - 2 ** 40, p - 2 ** 40, q_len=4, k_len=4))
    float32 = alibi_bias(alibi_slopes(4), torch.tensor([0]), torch.tensor([2 ** 24]), q_len=1, k_len=1).flatten()
    assert float32.tolist() == [-(2 ** 24) * s for s in alibi_slopes(4).tolist()]


def test_every_kind_of_positions_matches_the_definition(device):
    layer = _layer(device)
    x, mem = _inputs(device)
    for kv in (x, mem):
        for qk in position_kinds(3, 6, 20, device, offset=-7):
            for kk in position_kinds(3, kv.shape[1], 20, device, offset=-3):
                kw = {**stream('q', qk), **stream('k', kk)}
                out, w = layer(x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                ref, ref_w = alibi_reference(layer, x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                close(out, ref); close(w, ref_w)
                close(layer(x, kv, kv, **kw)[0], ref)  # the fused path, without weights


def test_every_mask_matches_the_definition(device):
    layer = _layer(device)
    x, mem = _inputs(device)
    positions = dict(q_positions=torch.tensor([4, -2, 0, 9, 1, 3], device=device), k_position_mask=torch.rand(9, device=device) < 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # torch's note on mixed bool and float masks, in the oracle
        for kw in mask_kinds(3, 4, 6, 9, device).values():
            ref = alibi_reference(layer, x, mem, mem, **positions, **kw)[0]
            close(layer(x, mem, mem, **positions, **kw)[0], ref)
            close(layer(x, mem, mem, need_weights=True, **positions, **kw)[0], ref)
        causal = alibi_reference(layer, x, mem, mem, attn_mask=causal_mask(6, 9, device), **positions)[0]
        close(layer(x, mem, mem, is_causal=True, **positions)[0], causal)
        close(layer(x, mem, mem, is_causal=True, need_weights=True, **positions)[0], causal)


OPTIONS = {'add_bias_kv': dict(add_bias_kv=True), 'add_zero_attn': dict(add_zero_attn=True),
           'kdim vdim': dict(kdim=8, vdim=12), 'everything': dict(bias=False, add_bias_kv=True, add_zero_attn=True, kdim=8, vdim=12)}


@pytest.mark.parametrize('options', OPTIONS.values(), ids=OPTIONS.keys())
def test_torchs_options_match_the_definition(device, options):
    "torch's extra keys gain no bias; keys and values of other widths; causal, padded, with and without weights."
    layer = _layer(device, **options)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    key = torch.randn(3, 9, options.get('kdim', 16), dtype=DTYPE, device=device)
    value = torch.randn(3, 9, options.get('vdim', 16), dtype=DTYPE, device=device)
    kpm = torch.zeros(3, 9, dtype=torch.bool, device=device); kpm[1, -3:] = True
    kw = dict(q_positions=torch.randint(-20, 20, (3, 6), device=device), k_position_mask=torch.rand(9, device=device) < 0.7,
              key_padding_mask=kpm)
    for need_weights in (False, True):
        ref = alibi_reference(layer, x, key, value, attn_mask=causal_mask(6, 9, device), need_weights=True, **kw)
        out = layer(x, key, value, is_causal=True, need_weights=need_weights, **kw)
        close(out[0], ref[0])
        if need_weights: close(out[1], ref[1])


def test_dropout_draws_alike_on_both_paths(device):
    layer = _layer(device, dropout=0.4).train()
    x, mem = _inputs(device)
    torch.manual_seed(1); fused = layer(x, mem, mem, is_causal=True)[0]
    torch.manual_seed(1); plain = layer(x, mem, mem, is_causal=True, need_weights=True)[0]
    close(fused, plain)


def test_sequence_first_unbatched_and_nested_inputs(device):
    layer = _layer(device)
    seq_first = ALiBiMultiheadAttention(16, 4, dtype=DTYPE, device=device, batch_first=False)
    seq_first.load_state_dict(layer.state_dict())
    x, mem = _inputs(device)
    p = torch.randint(-5, 5, (3, 6), device=device)
    xt = x.transpose(0, 1).contiguous()
    close(seq_first(xt, xt, xt, q_positions=p, k_positions=p)[0].transpose(0, 1), layer(x, x, x, q_positions=p, k_positions=p)[0])
    kw = dict(q_positions=p[0], k_positions=torch.arange(9, device=device) - 4, need_weights=True)
    out, w = layer(x[1], mem[1], mem[1], **kw)
    ref, ref_w = alibi_reference(layer, x[1:2], mem[1:2], mem[1:2], **kw)
    close(out, ref[0]); close(w, ref_w[0])
    lengths = [6, 4, 2]
    nested = torch.nested.nested_tensor([x[b, :n] for b, n in enumerate(lengths)])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # torch's note that nested tensors are a prototype
        out = layer.eval()(nested, nested, nested)[0]
    for b, n in enumerate(lengths): close(out[b], layer(x[b:b + 1, :n], x[b:b + 1, :n], x[b:b + 1, :n])[0][0])


def test_only_distances_matter(device):
    "A shift of every position, and a reflection (p -> c - p), change no distance, so nothing; a swap does."
    layer = _layer(device)
    x, mem = _inputs(device)
    q, k = torch.randint(-50, 50, (3, 6), device=device), torch.randint(-50, 50, (9,), device=device)
    out = layer(x, mem, mem, q_positions=q, k_positions=k)[0]
    close(layer(x, mem, mem, q_positions=q + 10 ** 9, k_positions=k + 10 ** 9)[0], out)
    close(layer(x, mem, mem, q_positions=7 - q, k_positions=7 - k)[0], out)
    assert (layer(x, mem, mem, q_positions=q, k_positions=k[[1, 0, *range(2, 9)]])[0] - out).abs().max() > 1e-3


def test_far_keys_are_damped_geometrically():
    "Keys that are all alike get weights proportional to exp(-m_h d) per head, at any length: a head's decay is its slope."
    layer = _layer('cpu', H=8, D=16)
    x, mem = _inputs('cpu', B=1, Tq=1, Tk=1)
    keys = mem.expand(1, 500, 16)
    w = layer(x, keys, keys, k_positions=torch.arange(500), need_weights=True, average_attn_weights=False)[1][0, :, 0]
    decay = torch.exp(-layer.slopes[:, None] * torch.arange(500, dtype=DTYPE))
    torch.testing.assert_close(w, decay / decay.sum(-1, keepdim=True), rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------------------------------------------------
# The buffer

def test_state_dict_round_trip_of_given_slopes(device):
    layer = _layer(device, slopes=[0.3, 0.2, 0.1, 0.0])
    assert list(layer.state_dict())[0] == 'slopes'
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = ALiBiMultiheadAttention(16, 4, dtype=DTYPE, device=device)  # the paper's slopes until loaded
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.slopes.tolist() == [0.3, 0.2, 0.1, 0.0]
    x, mem = _inputs(device)
    close(fresh(x, mem, mem, is_causal=True)[0], layer(x, mem, mem, is_causal=True)[0])
    state = layer.state_dict(); del state['slopes']
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "slopes"'): fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'size mismatch for slopes'):
        fresh.load_state_dict({**layer.state_dict(), 'slopes': torch.zeros(3, dtype=DTYPE)})


def test_slopes_get_no_gradient_and_no_optimiser_step(device):
    layer = _layer(device).train()
    x, mem = _inputs(device)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.slopes.clone()
    layer(x, mem, mem, is_causal=True)[0].square().sum().backward()
    optimiser.step()
    assert torch.equal(layer.slopes, before) and layer.slopes.grad is None
    assert all(p.grad is not None for p in layer.parameters())
    layer.reset_parameters()
    assert torch.equal(layer.slopes, before)  # fixed: reset keeps them


def test_module_casts_move_the_buffer_and_the_bias_stays_float32():
    "`.to(dtype)` casts the slopes as torch casts any floating buffer; the bias is still computed in float32."
    layer = ALiBiMultiheadAttention(16, 4).to(torch.bfloat16)
    assert layer.slopes.dtype == torch.bfloat16 and layer.slopes.tolist() == alibi_slopes(4).tolist()  # powers of two: exact
    bias = layer.pair_bias(torch.tensor([0]), torch.tensor([3001]), q_len=1, k_len=1)
    assert bias.dtype == torch.float32 and bias.flatten().tolist() == [-3001 * s for s in alibi_slopes(4).tolist()]
    assert copy.deepcopy(layer).to(torch.float64).slopes.dtype == torch.float64


def test_gradcheck(device):
    layer = _layer(device, D=8, H=2)
    x, mem = _inputs(device, B=2, Tq=3, Tk=4, D=8)
    qp, km = torch.tensor([5, -1, 2], device=device), torch.tensor([True, False, True, True], device=device)
    f = lambda q, k, v: layer(q, k, v, q_positions=qp, k_position_mask=km, is_causal=True)[0]
    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (x, mem, mem)])


# ---------------------------------------------------------------------------------------------------------------------
# Decoding, conversion, models

@pytest.mark.parametrize('sizes', [(5, 1, 1, 1, 1, 1), (4, 3, 2, 1), (10,)], ids=['token by token', 'in chunks', 'in one call'])
def test_decoding_is_recomputing(device, sizes):
    """Decoding with a cache from time stamps of each sample that step by 3, a position mask and left padding gives the
    layer and the oracle on the whole sequence, causally; then positions the cache counts on from a left-padded prompt."""
    layer = _layer(device).eval()
    x = torch.randn(3, 10, 16, dtype=DTYPE, device=device)
    stamps = torch.arange(-30, 0, 3, device=device) + torch.tensor([0, 5, -7], device=device)[:, None]
    mask = torch.rand(3, 10, device=device) < 0.8
    kpm = torch.arange(10, device=device) < torch.tensor([0, 2, 3], device=device)[:, None]
    whole = dict(q_positions=stamps, k_positions=stamps, q_position_mask=mask, k_position_mask=mask, key_padding_mask=kpm)
    expected = layer(x, x, x, is_causal=True, **whole)[0]
    # real tokens only: a padded query sees no key at all (the causal mask and the padding), a row of no meaning
    close(expected[~kpm], alibi_reference(layer, x, x, x, attn_mask=causal_mask(10, 10, device), **whole)[0][~kpm])
    cache, outs, start = layer.init_cache(batch_size=3, max_length=10), [], 0
    for n in sizes:
        part, end = x[:, start:start + n], start + n
        outs.append(layer(part, part, part, cache=cache, is_causal=True, k_positions=stamps[:, start:end],
                          k_position_mask=mask[:, start:end], key_padding_mask=kpm[:, start:end])[0])
        start = end
    close(torch.cat(outs, dim=1)[~kpm], expected[~kpm])
    positions, position_mask = padded_positions(kpm)
    counted = layer(x, x, x, is_causal=True, q_positions=positions, k_positions=positions, q_position_mask=position_mask,
                    k_position_mask=position_mask, key_padding_mask=kpm)[0]
    cache, outs, start = layer.init_cache(batch_size=3, max_length=10), [], 0
    for n in sizes:
        part = x[:, start:start + n]
        outs.append(layer(part, part, part, cache=cache, is_causal=True, key_padding_mask=kpm[:, start:start + n])[0])
        start += n
    close(torch.cat(outs, dim=1)[~kpm], counted[~kpm])


def test_cross_attention_decodes_against_a_written_memory(device):
    "The memory written once with its positions, then queries at their own positions attend to it, call by call."
    layer = _layer(device).eval()
    x, mem = _inputs(device)
    q_positions, k_positions = torch.arange(6, device=device) + 20, torch.arange(9, device=device) * 2
    cache = layer.init_cache(batch_size=3, max_length=9)
    first = layer(x[:, :2], mem, mem, cache=cache, q_positions=q_positions[:2], k_positions=k_positions)[0]
    rest = layer(x[:, 2:], None, None, cache=cache, q_positions=q_positions[2:])[0]
    close(torch.cat([first, rest], dim=1), alibi_reference(layer, x, mem, mem, q_positions=q_positions, k_positions=k_positions)[0])


def test_from_mha_and_convert(device):
    "Weights copied, the paper's slopes or those given; zero slopes compute what the module computed."
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, device=device, kdim=8, vdim=8, add_bias_kv=True)).eval()
    layer = ALiBiMultiheadAttention.from_mha(mha)
    assert layer.slopes.tolist() == alibi_slopes(4, dtype=DTYPE).tolist() and layer.slopes.dtype == DTYPE and layer.kdim == 8
    x, key = torch.randn(3, 6, 16, dtype=DTYPE, device=device), torch.randn(3, 9, 8, dtype=DTYPE, device=device)
    close(layer(x, key, key)[0], alibi_reference(layer, x, key, key)[0])
    close(ALiBiMultiheadAttention.from_mha(mha, slopes=[0.0] * 4)(x, key, key)[0], mha(x, key, key)[0])
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, dtype=DTYPE, device=device))
    converted = ALiBiMultiheadAttention.convert(copy.deepcopy(model), slopes=torch.zeros(4)).eval()
    assert isinstance(converted[0].self_attn, ALiBiMultiheadAttention)
    with torch.no_grad(): close(converted(x), model.eval()(x))


def test_a_language_model_reads_past_its_nominal_length():
    "An ALiBi model needs no max_len: it reads 3 times the test models' length, and its cached logits are the recomputed ones."
    model = lm('alibi')
    assert model.max_len is None and all(not n.endswith('slopes') for n, _ in model.named_parameters())
    tokens = torch.randint(0, 23, (2, 48))
    logits = model(tokens)
    cache = model.init_cache(2, 48)
    steps = [model(tokens[:, :40], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(40, 48)]
    close(torch.cat(steps, dim=1), logits)


def test_refusals():
    layer = _layer('cpu')
    x, mem = _inputs('cpu')
    cases = [(ValueError, r"embed_dim must be divisible by num_heads, got embed_dim=16, num_heads=3", lambda: ALiBiMultiheadAttention(16, 3)),
             (TypeError, r"batch_first must be a bool, got int 1", lambda: ALiBiMultiheadAttention(16, 4, batch_first=1)),
             (TypeError, r"got an unexpected keyword argument 'max_len'", lambda: ALiBiMultiheadAttention(16, 4, max_len=8)),
             (TypeError, r"query must have the layer's dtype torch.float64 \(or run under autocast\), got torch.float32",
              lambda: layer(x.float(), mem.float(), mem.float())),
             (ValueError, r"k_positions must have shape \(9,\) or \(3, 9\), got \(6,\)",
              lambda: layer(x, mem, mem, k_positions=torch.zeros(6, dtype=torch.long))),
             (TypeError, r"q_position_mask must be a bool Tensor", lambda: layer(x, mem, mem, q_position_mask=torch.ones(6)))]
    for error, message, call in cases:
        with pytest.raises(error, match=message): call()


@settings(max_examples=40, **SETTINGS)
@given(st.data())
def test_random_valid_calls_match_the_definition(data):
    "Random sizes, slopes, any integer positions (shared or per sample), position masks, attention masks, flags."
    sizes = data.draw(valid_cases())
    H, D, B, Tq, Tk, seed = (sizes[k] for k in ('H', 'D', 'B', 'Tq', 'Tk', 'seed'))
    slopes = data.draw(st.sampled_from([None, 'zero', 'random']), label='slopes')
    g = torch.Generator().manual_seed(seed)
    given_slopes = None if slopes is None else torch.zeros(H) if slopes == 'zero' else torch.rand(H, generator=g) * 2 - 0.5
    layer = _layer('cpu', D=D, H=H, seed=seed, slopes=given_slopes)
    check_random_call(data, layer, alibi_reference, g, B=B, Tq=Tq, Tk=Tk, low=-1000, high=1000)
