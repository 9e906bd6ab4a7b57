"""`RoPEMultiheadAttention` exhaustively, on every device, in float64 to 1e-12: against `rope_reference` for every kind
of positions, position masks and attention masks, with and without biases and weights, self- and cross-attention,
both pair conventions; against its own `attn` where nothing is turned; dropout, gradients (with `gradcheck`),
sequence-first inputs, the float32 angles under bfloat16 autocast, every refusal, `reset_parameters`, the state
dict, `torch.compile`, and a derandomised property test. The chapter keeps a few of each as examples."""
import copy, io

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from additive_pos_attn.attention import attend_heads, choose_path, project_heads
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.rotary import (RoPEMultiheadAttention, _pairs_as_complex, pair_order, rope_angles,
                                      rope_reference, rotate)
from additive_pos_attn.testing import random_layer
from cases import DTYPE, close, randomise

# Positions stay within ±1000 where the oracle is held to 1e-12: an angle near 10^4 radians carries ~1e-12 of float64
# rounding, which two honest computations of it (the layer's and the oracle's) do not share.
PROPERTY_EXAMPLES = 80
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])



def _case(device, *, bias=True, interleaved=True, batch_first=True, dropout=0.0, B=3, Tq=6, Tk=9, D=16, H=4, seed=0):
    "`random_layer` of the rotary kind, and inputs `x` `(B, Tq, D)`, `mem` `(B, Tk, D)` drawn after it."
    layer = random_layer(D, H, kind='rotary', bias=bias, interleaved=interleaved, batch_first=batch_first,
                         dropout=dropout, seed=seed, device=device)
    return layer, *(torch.randn(B, T, D, dtype=DTYPE, device=device) for T in (Tq, Tk))


def _attention_masks(B, H, Tq, Tk, device):
    "Every kind of attention mask the layer takes, for a (B, Tq, Tk) attention; key 0 is never masked."
    g = torch.Generator().manual_seed(0)
    blocked = torch.rand(Tq, Tk, generator=g) < 0.3
    blocked[:, 0] = False
    padded = torch.zeros(B, Tk, dtype=torch.bool); padded[0, max(1, Tk - 2):] = True
    kinds = {'none': {}, 'bool 2-D': dict(attn_mask=blocked), 'float 2-D': dict(attn_mask=torch.randn(Tq, Tk, generator=g, dtype=DTYPE)),
             'bool 3-D': dict(attn_mask=blocked.repeat(B * H, 1, 1)), 'float 3-D': dict(attn_mask=torch.randn(B * H, Tq, Tk, generator=g, dtype=DTYPE)),
             'bool padding': dict(key_padding_mask=padded),
             'float padding': dict(key_padding_mask=torch.zeros(B, Tk, dtype=DTYPE).masked_fill(padded, float('-inf'))),
             'both': dict(attn_mask=blocked, key_padding_mask=padded)}
    return {name: {k: v.to(device) for k, v in kw.items()} for name, kw in kinds.items()}


def _stream_kinds(prefix, B, T, device):
    "Every form of positions and position masks for one stream: default, shared, per-sample, negative, small int dtypes."
    g = torch.Generator().manual_seed(T)
    shared, per_sample = torch.randint(-40, 40, (T,), generator=g), torch.randint(0, 1000, (B, T), generator=g)
    m1, m2 = torch.rand(T, generator=g) < 0.5, torch.rand(B, T, generator=g) < 0.5
    kinds = [{}, dict(positions=shared), dict(positions=per_sample), dict(position_mask=m1), dict(position_mask=m2),
             dict(positions=shared, position_mask=m1), dict(positions=per_sample, position_mask=m2),
             dict(positions=shared.to(torch.int8)), dict(positions=per_sample.int())]
    return [{f'{prefix}_{k}': v.to(device) for k, v in kind.items()} for kind in kinds]


def _check_against_reference(layer, query, key, value, **kw):
    "The layer with and without weights (per head and averaged) equals the oracle; returns the output."
    ref, ref_weights = rope_reference(layer, query, key, value, need_weights=True, average_attn_weights=False, **kw)
    out, weights = layer(query, key, value, need_weights=True, average_attn_weights=False, **kw)
    close(out, ref); close(weights, ref_weights)
    out, weights = layer(query, key, value, need_weights=True, **kw)
    close(out, ref); close(weights, ref_weights.mean(dim=1))
    out, weights = layer(query, key, value, **kw)
    close(out, ref); assert weights is None
    return out


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('interleaved', [True, False])
def test_every_mask_matches_the_definition(device, bias, interleaved):
    layer, x, mem = _case(device, bias=bias, interleaved=interleaved)
    positions = dict(q_positions=torch.arange(6, device=device) * 3 - 7)
    for kv in (x, mem):
        for kw in _attention_masks(3, 4, 6, kv.shape[1], device).values():
            _check_against_reference(layer, x, kv, kv, **kw)
            _check_against_reference(layer, x, kv, kv, **positions, **kw)
        causal = causal_mask(6, kv.shape[1], device)
        for extra in ({}, dict(attn_mask=causal), dict(key_padding_mask=_attention_masks(3, 4, 6, kv.shape[1], device)['bool padding']['key_padding_mask'])):
            ref = rope_reference(layer, x, kv, kv, **{**extra, 'attn_mask': causal}, need_weights=True)
            for need_weights in (False, True):
                out, weights = layer(x, kv, kv, is_causal=True, need_weights=need_weights, **extra)
                close(out, ref[0])
                if need_weights: close(weights, ref[1])


def test_every_kind_of_positions_matches_the_definition(device):
    "Self- and cross-attention, each stream with its own positions and position masks, in every form."
    layer, x, mem = _case(device)
    for kv in (x, mem):
        for q_kind in _stream_kinds('q', 3, 6, device):
            for k_kind in _stream_kinds('k', 3, kv.shape[1], device):
                _check_against_reference(layer, x, kv, kv, **q_kind, **k_kind)
    value = torch.randn_like(mem)  # key and value apart
    _check_against_reference(layer, x, mem, value, q_positions=torch.tensor([-3, -2, -1, 0, 1, 2], device=device))


@pytest.mark.parametrize('interleaved', [True, False])
def test_where_nothing_turns_it_is_the_wrapped_module(device, interleaved):
    "All positions equal (0 or not, shared or per sample), or every position mask False: `nn.MultiheadAttention`."
    layer, x, mem = _case(device, interleaved=interleaved)
    assert (layer(x, mem, mem)[0] - layer.attn(x, mem, mem)[0]).abs().max() > 1e-3  # a fresh layer turns
    long = lambda *shape, value: torch.full(shape, value, dtype=torch.long, device=device)
    off = lambda *shape: torch.zeros(shape, dtype=torch.bool, device=device)
    nothing_turns = [dict(q_positions=long(6, value=0), k_positions=long(9, value=0)),
                     dict(q_positions=long(3, 6, value=-11), k_positions=long(9, value=-11)),
                     dict(q_positions=torch.arange(3, device=device)[:, None].expand(3, 6), k_positions=torch.arange(3, device=device)[:, None].expand(3, 9)),
                     dict(q_position_mask=off(6), k_position_mask=off(3, 9)),
                     dict(q_positions=long(6, value=4), k_position_mask=off(9), q_position_mask=off(6))]
    for kw in nothing_turns:
        for masks in _attention_masks(3, 4, 6, 9, device).values():
            for need_weights, average in ((False, True), (True, True), (True, False)):
                out, weights = layer(x, mem, mem, need_weights=need_weights, average_attn_weights=average, **kw, **masks)
                ref, ref_weights = layer.attn(x, mem, mem, need_weights=need_weights, average_attn_weights=average, **masks)
                close(out, ref)
                if need_weights: close(weights, ref_weights)


def test_position_masks_turn_single_tokens_off(device):
    layer, x, _ = _case(device)
    mask = torch.ones(3, 6, dtype=torch.bool, device=device); mask[1] = False
    out = layer(x, x, x, q_position_mask=mask, k_position_mask=mask)[0]
    close(out[0], layer(x[:1], x[:1], x[:1])[0][0])
    close(out[1], layer.attn(x[1:2], x[1:2], x[1:2])[0][0])
    positions = torch.arange(6, device=device) + 100  # a masked token's position is never read
    garbage = torch.where(mask[0], positions, torch.randint(-10**6, 10**6, (6,), device=device))
    close(layer(x, x, x, q_positions=garbage, q_position_mask=mask[0])[0], layer(x, x, x, q_positions=positions, q_position_mask=mask[0])[0])


def test_shifting_every_position_changes_nothing(device):
    "Only offsets count: the same integer added to both streams' positions (per sample too) gives the same output."
    layer, x, mem = _case(device)
    qp, kp = torch.randint(-30, 30, (3, 6), device=device), torch.randint(-30, 30, (9,), device=device)
    out = layer(x, mem, mem, q_positions=qp, k_positions=kp)[0]
    for shift in (1, -17, 4096):
        close(layer(x, mem, mem, q_positions=qp + shift, k_positions=kp + shift)[0], out)
    per_sample = torch.tensor([[0], [5], [-300]], device=device)
    close(layer(x, mem, mem, q_positions=qp + per_sample, k_positions=kp + per_sample)[0], out)


def test_left_padding_needs_no_positions(device):
    layer, x, _ = _case(device)
    lengths = torch.tensor([6, 4, 1], device=device)
    kpm = torch.arange(6, device=device) < (6 - lengths)[:, None]
    out = layer(x.masked_fill(kpm[..., None], 123.0), x.masked_fill(kpm[..., None], 123.0), x, key_padding_mask=kpm)[0]
    for b, n in enumerate(lengths.tolist()):
        alone = x[b:b + 1, 6 - n:]
        close(out[b, 6 - n:], layer(alone, alone, alone)[0][0])


@pytest.mark.parametrize('bias', [True, False])
def test_dropout_paths_agree(device, bias):
    "With dropout in training mode, the same seed drops the same weights with and without `need_weights`."
    layer, x, mem = _case(device, bias=bias, dropout=0.5)
    for kv, kw in ((x, dict(is_causal=True)), (mem, _attention_masks(3, 4, 6, 9, device)['both'])):
        torch.manual_seed(1); fused = layer(x, kv, kv, **kw)[0]
        torch.manual_seed(1); with_weights = layer(x, kv, kv, need_weights=True, **kw)[0]
        close(fused, with_weights)
        torch.manual_seed(2); assert not torch.allclose(layer(x, kv, kv, **kw)[0], fused)
    layer.eval()
    close(layer(x, mem, mem)[0], rope_reference(layer, x, mem, mem)[0])


def test_gradcheck(device):
    layer, x, mem = _case(device, B=2, Tq=3, Tk=4, D=8, H=2)
    qp, km = torch.tensor([5, -1, 2], device=device), torch.tensor([True, False, True, True], device=device)
    params = dict(layer.named_parameters())
    def f(q, k, v, weight):
        out = torch.func.functional_call(layer, {**params, 'attn.in_proj_weight': weight}, (q, k, v),
                                         dict(q_positions=qp, k_position_mask=km, is_causal=True))
        return out[0]
    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (x, mem, mem, layer.attn.in_proj_weight)])


def test_gradients_match_the_definition(device):
    layer, x, mem = _case(device)
    kw = dict(q_positions=torch.randint(-9, 9, (3, 6), device=device), k_position_mask=torch.rand(9, device=device) < 0.5)
    wrt = [x.requires_grad_(), mem.requires_grad_(), *layer.parameters()]
    for need_weights in (False, True):
        grads = torch.autograd.grad(layer(x, mem, mem, need_weights=need_weights, **kw)[0].square().sum(), wrt)
        for grad, ref in zip(grads, torch.autograd.grad(rope_reference(layer, x, mem, mem, **kw)[0].square().sum(), wrt)): close(grad, ref)


def test_sequence_first_is_the_batch_first_layer(device):
    layer, x, mem = _case(device)
    seq_first = RoPEMultiheadAttention(16, 4, dtype=DTYPE, device=device, batch_first=False)
    seq_first.load_state_dict(layer.state_dict())
    kw = dict(q_positions=torch.randint(-20, 20, (3, 6), device=device), k_position_mask=torch.rand(9, device=device) < 0.5,
              key_padding_mask=_attention_masks(3, 4, 6, 9, device)['bool padding']['key_padding_mask'], need_weights=True)
    out, weights = seq_first(x.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1), **kw)
    ref, ref_weights = rope_reference(layer, x, mem, mem, **kw)
    assert out.shape == (6, 3, 16)
    close(out.transpose(0, 1), ref); close(weights, ref_weights)
    xt = x.transpose(0, 1).contiguous()  # self-attention, one tensor, as a sequence-first model passes it
    close(seq_first(xt, xt, xt, is_causal=True)[0].transpose(0, 1), layer(x, x, x, is_causal=True)[0])
    with pytest.raises(ValueError, match=r"q_positions must have shape \(6,\) or \(3, 6\), got \(6, 3\)"):
        seq_first(xt, xt, xt, q_positions=torch.zeros(6, 3, dtype=torch.long, device=device))


def test_the_conventions_differ_by_an_order_of_rows(device):
    "A checkpoint of either convention, its query and key rows reordered by `pair_order`, runs in a layer of the other."
    torch.manual_seed(0)
    heads = torch.randn(2, 3, 5, 8, dtype=DTYPE, device=device)
    positions = torch.randint(-100, 100, (2, 5), device=device)
    order = pair_order(8).to(device)
    close(rotate(heads, positions, interleaved=False), rotate(heads[..., order], positions)[..., order.argsort()])
    for source_interleaved in (True, False):
        source, x, mem = _case(device, interleaved=source_interleaved)
        target = RoPEMultiheadAttention(16, 4, dtype=DTYPE, device=device, interleaved=not source_interleaved)
        rows = pair_order(4, 4).to(device)
        if source_interleaved: rows = rows.argsort()  # interleaved -> half-split: the inverse order
        checkpoint = source.state_dict()
        for name in ('attn.in_proj_weight', 'attn.in_proj_bias'):
            q_rows, k_rows, v_rows = checkpoint[name].chunk(3)
            checkpoint[name] = torch.cat((q_rows[rows], k_rows[rows], v_rows))
        kw = dict(q_positions=torch.randint(-50, 50, (3, 6), device=device), need_weights=True)
        target.load_state_dict(source.state_dict())  # the rows as they are: another layer
        assert (target(x, mem, mem, **kw)[0] - source(x, mem, mem, **kw)[0]).abs().max() > 1e-3
        target.load_state_dict(checkpoint)
        for a, b in zip(target(x, mem, mem, **kw), source(x, mem, mem, **kw)): close(a, b)


def test_angles_are_float32_under_bfloat16_autocast():
    "At large positions bfloat16 angles are wrong by radians; the layer's, computed in float32, are not."
    positions = torch.tensor([1001, 4097, 30001, 65537])
    exact = rope_angles(positions, 64, dtype=DTYPE)
    assert (rope_angles(positions, 64, dtype=torch.bfloat16).double() - exact).abs().max() > 40
    close(rope_angles(positions, 64).double(), exact, 2e-3)
    torch.manual_seed(0)
    heads = torch.randn(2, 4, 4, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        turned = rotate(heads.bfloat16(), positions)
    assert turned.dtype == torch.bfloat16
    close(turned.double(), rotate(heads.double(), positions), 0.05)  # bfloat16 rounding of values of size ~3
    layer = RoPEMultiheadAttention(16, 4)
    x = torch.randn(2, 4, 16)
    kw = dict(q_positions=positions, k_positions=positions.flip(0), is_causal=True)
    ref = rope_reference(layer, x, x, x, q_positions=positions, k_positions=positions.flip(0), attn_mask=causal_mask(4, 4))[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for need_weights in (False, True):
            out = layer(x, x, x, need_weights=need_weights, **kw)[0]
            close(out.double(), ref, 0.03 * ref.abs().max().item())


@pytest.mark.parametrize('dtype, eps', [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])  # relative to the largest output
def test_lower_precisions_follow_the_float64_definition(device, dtype, eps):
    layer, x, mem = _case(device)
    kw = dict(q_positions=torch.tensor([3000, 1, 4, 1, 5, 9], device=device), k_positions=torch.arange(9, device=device) * 300)
    ref = rope_reference(layer, x, mem, mem, **kw)[0]
    out = copy.deepcopy(layer).to(dtype)(x.to(dtype), mem.to(dtype), mem.to(dtype), **kw)[0]
    assert out.dtype == dtype
    close(out.double().detach(), ref.detach(), eps * ref.abs().max().item())


@pytest.mark.parametrize('embed_dim, num_heads, head_dim', [(12, 4, 3), (5, 1, 5), (6, 6, 1)])
def test_odd_head_dim_is_refused(embed_dim, num_heads, head_dim):
    with pytest.raises(ValueError, match=rf"head_dim = embed_dim // num_heads must be even, got embed_dim={embed_dim}, "
                                         rf"num_heads={num_heads}, head_dim={head_dim}"):
        RoPEMultiheadAttention(embed_dim, num_heads)
    with pytest.raises(ValueError, match=r"x's last dimension must be even, got shape \(2, 3\)"): rotate(torch.zeros(2, 3))


@pytest.mark.parametrize('value, error, message', [
    (-1.0, ValueError, r"rope_base must be a positive, finite float, got -1.0"), (0, ValueError, r"got 0"),
    (float('inf'), ValueError, r"got inf"), (float('nan'), ValueError, r"got nan"),
    ('10000', TypeError, r"rope_base must be a float, got str '10000'"), (True, TypeError, r"got bool True"),
    (torch.tensor(10000.0), TypeError, r"rope_base must be a float, got Tensor")])
def test_bad_rope_base_is_refused(value, error, message):
    with pytest.raises(error, match=message): RoPEMultiheadAttention(16, 4, rope_base=value)


def test_other_bad_arguments_are_refused():
    assert RoPEMultiheadAttention(16, 4, rope_base=500).rope_base == 500.0  # an int base is a float base
    with pytest.raises(TypeError, match=r"interleaved must be a bool, got int 1"): RoPEMultiheadAttention(16, 4, interleaved=1)
    with pytest.raises(TypeError, match=r"batch_first must be a bool"): RoPEMultiheadAttention(16, 4, batch_first=None)
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads, got embed_dim=16, num_heads=3"): RoPEMultiheadAttention(16, 3)
    with pytest.raises(TypeError, match=r"max_len"): RoPEMultiheadAttention(16, 4, max_len=8)


def test_bad_inputs_are_refused_by_the_base_checks(device):
    layer, x, mem = _case(device)
    long = dict(dtype=torch.long, device=device)
    refusals = [
        (TypeError, r"q_positions must be an integer Tensor \(int64, int32, int16, int8 or uint8\), got dtype torch.float64",
         dict(q_positions=torch.zeros(6, dtype=DTYPE, device=device))),
        (TypeError, r"k_positions must be an integer Tensor, got list", dict(k_positions=list(range(9)))),
        (ValueError, r"k_positions must have shape \(9,\) or \(3, 9\), got \(3, 6\)", dict(k_positions=torch.zeros(3, 6, **long))),
        (ValueError, r"q_positions must have shape \(6,\) or \(3, 6\), got \(2, 6\)", dict(q_positions=torch.zeros(2, 6, **long))),
        (ValueError, r"q_position_mask must have the shape of its positions \(6,\), got \(3, 6\)",
         dict(q_positions=torch.zeros(6, **long), q_position_mask=torch.ones(3, 6, dtype=torch.bool, device=device))),
        (TypeError, r"k_position_mask must be a bool Tensor, got dtype torch.int64", dict(k_position_mask=torch.ones(9, **long))),
        (ValueError, r"attn_mask must have shape \(6, 9\) or \(12, 6, 9\), got \(6, 6\)", dict(attn_mask=torch.zeros(6, 6, dtype=torch.bool, device=device))),
        (TypeError, r"key_padding_mask must be bool or of the query's dtype torch.float64, got dtype torch.float32",
         dict(key_padding_mask=torch.zeros(3, 9, device=device))),
        (TypeError, r"need_weights must be a bool, got int 1", dict(need_weights=1))]
    if device == 'cuda':
        refusals.append((ValueError, r"q_positions must be on the input's device cuda:0, got cpu", dict(q_positions=torch.arange(6))))
    else:
        refusals.append((ValueError, r"q_positions must be on the input's device cpu, got meta", dict(q_positions=torch.arange(6, device='meta'))))
    for error, message, kw in refusals:
        with pytest.raises(error, match=message): layer(x, mem, mem, **kw)
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float64 \(or run under autocast\), got torch.float32"):
        layer(x.float(), mem.float(), mem.float())
    with pytest.raises(ValueError, match=r"query must be 3-D \(B, T, D\) \(or, unbatched, 2-D \(T, D\)\), got shape \(16,\)"):
        layer(x[0, 0], x[0, 0], x[0, 0])


def test_what_needs_a_call_of_attn_is_refused(device):
    "A hook on `attn`, or a `forward` of its own: the layer never calls `attn`, so it refuses, quoting `choose_path`."
    layer, x, _ = _case(device)
    expected = layer(x, x, x)[0]
    for register in (layer.attn.register_forward_hook, layer.attn.register_forward_pre_hook):
        handle = register(lambda *args: None)
        with pytest.raises(ValueError, match=r"never calls its attn .*: attn has hooks, which only a call of attn runs"):
            layer(x, x, x, need_weights=True)
        handle.remove()
    layer.attn.forward = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match=r"never calls its attn .*: attn has a forward of its own"): layer(x, x, x)
    del layer.attn.forward
    assert choose_path(layer.attn, need_weights=False).name == 'fused'
    close(layer(x, x, x)[0], expected)


def test_reset_parameters_state_dict_and_repr(device):
    layer, x, mem = _case(device, interleaved=False)
    assert list(layer.state_dict()) == ['attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias']
    assert [name for name, _ in layer.named_buffers()] == ['pair_rows']  # not persistent: no state_dict key
    empty = RoPEMultiheadAttention(16, 4, interleaved=False, device='meta').to_empty(device=device)
    empty.reset_parameters()  # to_empty leaves buffers uninitialised
    assert torch.equal(empty.pair_rows, layer.pair_rows)
    buffer = io.BytesIO(); torch.save(layer.state_dict(), buffer); buffer.seek(0)
    loaded = RoPEMultiheadAttention(16, 4, dtype=DTYPE, device=device, interleaved=False)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    kw = dict(q_positions=torch.tensor([2, 7, 1, 8, 2, 8], device=device))
    close(loaded(x, mem, mem, **kw)[0], layer(x, mem, mem, **kw)[0])
    plain = nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, device=device)  # a plain checkpoint loads too
    loaded.attn.load_state_dict(plain.state_dict())
    layer.reset_parameters()
    assert layer.attn.in_proj_bias.abs().sum() == 0 and layer.attn.out_proj.bias.abs().sum() == 0
    assert repr(layer).splitlines()[1] == "  embed_dim=16, num_heads=4, rope_base=10000.0, interleaved=False"
    assert 'batch_first=False' in repr(RoPEMultiheadAttention(8, 2, batch_first=False, rope_base=10.0))


def test_empty_sequences(device):
    layer, x, mem = _case(device)
    out, weights = layer(x[:, :0], mem, mem, need_weights=True)
    assert out.shape == (3, 0, 16) and weights.shape == (3, 0, 9)


def _plane_rotation(x, positions=None, mask=None, *, interleaved=True):
    "`rotate` as it was before the complex path: each pair turned by four multiplies, a subtract and an add."
    length, d = x.shape[-2:]
    if positions is None: positions = torch.arange(length, device=x.device)
    angles = rope_angles(positions, d, mask=mask, dtype=torch.promote_types(x.dtype, torch.float32))
    if angles.dim() == 3: angles = angles.unsqueeze(1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    turned = (x1 * cos - x2 * sin, x1 * sin + x2 * cos)
    return torch.stack(turned, dim=-1).flatten(-2) if interleaved else torch.cat(turned, dim=-1)


@pytest.mark.parametrize('interleaved', [True, False])
@pytest.mark.parametrize('dtype, eps', [(torch.float32, 1e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize('self_attention', [True, False])
def test_the_complex_turn_is_the_plane_rotation(device, interleaved, dtype, eps, self_attention):
    torch.manual_seed(0)
    B, T, D, H = 3, 7, 32, 4
    attn = nn.MultiheadAttention(D, H, batch_first=True, dtype=dtype, device=device)
    x = torch.randn(B, T, D, dtype=dtype, device=device) * 3
    y = x if self_attention else torch.randn(B, T, D, dtype=dtype, device=device)
    q, k, _ = project_heads(attn, x, y, y)  # the heads the layer turns: views of the projection's output
    g = torch.Generator().manual_seed(1)
    kinds = [dict(), dict(positions=torch.randint(-1000, 1000, (T,), generator=g)),
             dict(positions=torch.randint(-1000, 1000, (B, T), generator=g)),
             dict(mask=torch.rand(T, generator=g) < 0.5), dict(positions=torch.randint(0, 99, (B, T), generator=g), mask=torch.rand(B, T, generator=g) < 0.5)]
    for heads in (q, k):
        assert _pairs_as_complex(heads, interleaved) == interleaved  # half-split pairs stay on the plane rotation
        for kw in kinds:
            kw = {name: t.to(device) for name, t in kw.items()}
            torch.testing.assert_close(rotate(heads, kw.get('positions'), kw.get('mask'), interleaved=interleaved),
                                       _plane_rotation(heads, interleaved=interleaved, **kw), rtol=0, atol=eps)
            if 'mask' in kw:  # masked tokens are not turned at all, bit for bit
                off = ~kw['mask'] if kw['mask'].dim() == 2 else (~kw['mask']).expand(B, T)
                turned = rotate(heads, kw.get('positions'), kw['mask'], interleaved=interleaved)
                torch.testing.assert_close(turned.transpose(1, 2)[off], heads.transpose(1, 2)[off], rtol=0, atol=0)


def test_layouts_and_dtypes_the_complex_view_cannot_take_use_the_plane_rotation(device):
    x = torch.randn(2, 3, 5, 10, dtype=DTYPE, device=device)
    positions = torch.randint(-50, 50, (2, 5), device=device)
    odd_offset, channels_apart = x[..., 1:9], x.transpose(-1, -2).contiguous().transpose(-1, -2)
    for heads in (odd_offset, channels_apart, x[..., ::2][..., :4]):
        assert not _pairs_as_complex(heads, True)
        close(rotate(heads, positions), _plane_rotation(heads, positions), eps=1e-14)
    assert _pairs_as_complex(x, True) and _pairs_as_complex(x.float(), True)
    for dtype in (torch.float16, torch.bfloat16):  # no complex bfloat16, and complex32 (chalf) has few kernels
        assert not _pairs_as_complex(x.to(dtype), True)
        torch.testing.assert_close(rotate(x.to(dtype), positions), _plane_rotation(x.to(dtype), positions), rtol=0, atol=0)


@pytest.mark.slow
def test_default_positions_compile_to_one_graph(device):
    torch._dynamo.reset()
    layer, x, _ = _case(device)
    try:
        explanation = torch._dynamo.explain(layer)(x, x, x, is_causal=True)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        compiled = torch.compile(layer, fullgraph=True)
        out, eager = compiled(x, x, x, is_causal=True)[0], layer(x, x, x, is_causal=True)[0]
        torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out, rope_reference(layer, x, x, x, attn_mask=causal_mask(6, 6, device))[0], rtol=1e-10, atol=1e-12)
        grads, eager_grads = (torch.autograd.grad(y.square().sum(), layer.attn.in_proj_weight) for y in (out, eager))
        torch.testing.assert_close(grads, eager_grads, rtol=1e-10, atol=1e-12)
    finally:
        torch._dynamo.reset()


def _draw_call(data, device):
    "A random valid call: `(layer, query, key, value, kwargs, oracle kwargs)`, inputs batch first as the oracle takes them."
    H = data.draw(st.sampled_from([1, 2, 4]), label='num_heads')
    D = H * 2 * data.draw(st.integers(1, 3), label='head_dim / 2')
    B, Tq, Tk = data.draw(st.integers(1, 3), label='batch'), data.draw(st.integers(0, 5), label='q_len'), data.draw(st.integers(1, 5), label='k_len')
    seed = data.draw(st.integers(0, 2**31 - 1), label='seed')
    torch.manual_seed(seed)
    layer = RoPEMultiheadAttention(D, H, dtype=DTYPE, bias=data.draw(st.booleans(), label='bias'),
                                   interleaved=data.draw(st.booleans(), label='interleaved'),
                                   batch_first=data.draw(st.booleans(), label='batch_first'),
                                   rope_base=data.draw(st.sampled_from([10000.0, 500.0, 2.0]), label='rope_base'))
    randomise(layer)
    layer.train(data.draw(st.booleans(), label='training'))  # dropout is 0: both modes are deterministic
    query = torch.randn(B, Tq, D, dtype=DTYPE)
    if Tq == Tk and data.draw(st.booleans(), label='self-attention'): key = value = query
    else: key = value = torch.randn(B, Tk, D, dtype=DTYPE)
    kw = {}
    for stream, T in (('q', Tq), ('k', Tk)):
        shape = data.draw(st.sampled_from([None, (T,), (B, T)]), label=f'{stream} positions shape')
        if shape is not None:
            kw[f'{stream}_positions'] = torch.randint(-1000, 1000, shape).to(data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16])))
        if data.draw(st.booleans(), label=f'{stream} position mask'):
            kw[f'{stream}_position_mask'] = torch.rand(shape or data.draw(st.sampled_from([(T,), (B, T)]))) < 0.5
    masks = _attention_masks(B, H, Tq, Tk, 'cpu')
    kw.update(masks[data.draw(st.sampled_from(sorted(masks)), label='attention masks')])
    is_causal = 'attn_mask' not in kw and data.draw(st.booleans(), label='is_causal')
    flags = dict(need_weights=data.draw(st.booleans(), label='need_weights'), average_attn_weights=data.draw(st.booleans(), label='average'))
    oracle_kw = {**kw, **flags, **({'attn_mask': causal_mask(Tq, Tk)} if is_causal else {})}
    to = lambda d: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    moved = {id(t): t.to(device) for t in (query, key)}
    return layer.to(device), moved[id(query)], moved[id(key)], moved[id(value)], to({**kw, **flags, 'is_causal': is_causal}), to(oracle_kw)


@settings(max_examples=PROPERTY_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_random_valid_calls_match_the_definition(device, data):
    "Random valid calls (sizes, conventions, layouts, positions, masks, flags) give the oracle's output and weights."
    layer, query, key, value, kw, oracle_kw = _draw_call(data, device)
    inputs = {id(t): t if layer.batch_first else t.transpose(0, 1).contiguous() for t in (query, key, value)}  # `is` kept
    out, weights = layer(inputs[id(query)], inputs[id(key)], inputs[id(value)], **kw)
    ref, ref_weights = rope_reference(layer, query, key, value, **oracle_kw)
    close(out if layer.batch_first else out.transpose(0, 1), ref)
    if kw['need_weights']: close(weights, ref_weights)
    else: assert weights is None


# ---- context extension (rope_scaling) and partial rotary (rotary_dim); Hugging Face parity: tests/test_hf_rope.py

from additive_pos_attn.blocks import positional_attention  # noqa: E402
from additive_pos_attn.lm import PosTransformerLM  # noqa: E402
from additive_pos_attn.rotary import check_rope_scaling, rope_frequencies, rope_scaled_frequencies  # noqa: E402

SCALINGS = {'linear': dict(rope_type='linear', factor=4.0),
            'dynamic': dict(rope_type='dynamic', factor=4.0, original_max_position_embeddings=8),
            'yarn': dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=8),
            'yarn-mscale': dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=8, mscale=0.7,
                                mscale_all_dim=1.0, beta_fast=8, beta_slow=2, truncate=False),
            'llama3': dict(rope_type='llama3', factor=8.0, original_max_position_embeddings=8, low_freq_factor=1.0,
                           high_freq_factor=4.0)}


def _scaled(device, name, *, interleaved=True, rotary_dim=None, D=32, H=2, seed=0):
    torch.manual_seed(seed)
    layer = RoPEMultiheadAttention(D, H, rope_scaling=SCALINGS.get(name), rotary_dim=rotary_dim, interleaved=interleaved,
                                   dtype=DTYPE, device=device)
    return randomise(layer)


@pytest.mark.parametrize('name', [None, *SCALINGS])
@pytest.mark.parametrize('interleaved', [True, False])
@pytest.mark.parametrize('rotary_dim', [None, pytest.param(6, marks=pytest.mark.slow)])
def test_every_scaling_matches_the_definition(device, name, interleaved, rotary_dim):
    "Each rope_type, convention and partial width equals the float64 oracle, for every kind of positions and masks."
    layer = _scaled(device, name, interleaved=interleaved, rotary_dim=rotary_dim)
    x, mem = (torch.randn(3, T, 32, dtype=DTYPE, device=device) for T in (6, 9))
    # every form of positions and position masks once for each stream (shared, per sample, masked, small dtypes)
    for q_kind, k_kind in zip(_stream_kinds('q', 3, 6, device)[1:], _stream_kinds('k', 3, 9, device)[:0:-1]):
        close(layer(x, mem, mem, **q_kind, **k_kind)[0], rope_reference(layer, x, mem, mem, **q_kind, **k_kind)[0])
    _check_against_reference(layer, x, x, x, attn_mask=causal_mask(6, 6, device))
    masks = _attention_masks(3, 2, 6, 9, device)['both']
    _check_against_reference(layer, x, mem, mem, q_positions=torch.arange(6, device=device) * 5, **masks)


def test_partial_rotary_of_every_scaling_matches_the_definition(device):
    "A partial turn, each rope_type and convention once (every combination: the slow cases above)."
    x, mem = (torch.randn(2, T, 32, dtype=DTYPE, device=device) for T in (5, 7))
    kw = dict(q_positions=torch.randint(0, 60, (2, 5), device=device), k_position_mask=torch.rand(7, device=device) < .5)
    for i, name in enumerate(SCALINGS):
        layer = _scaled(device, name, interleaved=bool(i % 2), rotary_dim=6)
        close(layer(x, mem, mem, **kw)[0], rope_reference(layer, x, mem, mem, **kw)[0])


@pytest.mark.parametrize('name', [None, *SCALINGS])
def test_scaled_self_attention_fast_path_is_the_general_path(device, name):
    "Without gradients, self-attention turns queries and keys together; it gives what the general path gives."
    layer = _scaled(device, name)
    x, p = torch.randn(2, 7, 32, dtype=DTYPE, device=device), torch.randint(0, 50, (2, 7), device=device)
    with torch.no_grad(): fast = layer(x, x, x, q_positions=p, k_positions=p)[0]
    close(fast, layer(x, x, x, q_positions=p, k_positions=p)[0], eps=1e-13)
    close(fast, rope_reference(layer, x, x, x, q_positions=p, k_positions=p)[0])


def test_plain_options_are_the_plain_layer(device):
    "'default', rotary_dim = head_dim and factor 1 are the plain layer, bit for bit or to rounding."
    plain = _scaled(device, None)
    x = torch.randn(2, 12, 32, dtype=DTYPE, device=device)
    want = plain(x, x, x, is_causal=True)[0]
    for options in (dict(rope_scaling={'rope_type': 'default'}), dict(rotary_dim=16),
                    dict(rope_scaling=dict(rope_type='linear', factor=1))):
        other = RoPEMultiheadAttention(32, 2, dtype=DTYPE, device=device, **options)
        other.load_state_dict(plain.state_dict())
        close(other(x, x, x, is_causal=True)[0], want, eps=1e-14)


def test_state_dicts_load_both_ways_and_casts_keep_the_frequencies(device):
    "A plain checkpoint loads into a scaled layer and back; .half()/.to(dtype) never round the kept frequencies."
    plain, scaled = _scaled(device, None), _scaled(device, 'yarn', rotary_dim=8, seed=1)
    assert list(plain.state_dict()) == list(scaled.state_dict())
    scaled.load_state_dict(plain.state_dict()); plain.load_state_dict(copy.deepcopy(scaled).state_dict())
    bits = scaled.frequency_bits.clone()
    assert torch.equal(copy.deepcopy(scaled).half().double().frequency_bits, bits)
    buffer = io.BytesIO(); torch.save(scaled, buffer); buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False).frequency_bits, bits)
    theta = rope_scaled_frequencies(8, 10000.0, SCALINGS['yarn'], device=device)[0]
    assert torch.equal(bits.view(torch.float64)[0], theta)
    assert 'frequency_bits' not in scaled.state_dict()
    empty = copy.deepcopy(scaled).to_empty(device=device)  # uninitialised buffers, as for meta-device models
    empty.reset_parameters()
    assert torch.equal(empty.frequency_bits, bits)


def test_dynamic_is_plain_below_the_original_length_and_follows_the_call_past_it(device):
    plain, dynamic = _scaled(device, None), _scaled(device, 'dynamic')
    dynamic.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 32, dtype=DTYPE, device=device)
    assert torch.equal(dynamic(x[:, :8], x[:, :8], x[:, :8])[0], plain(x[:, :8], x[:, :8], x[:, :8])[0])
    assert (dynamic(x, x, x)[0] - plain(x, x, x)[0]).abs().max() > 1e-6
    # the length is one past the largest position of either stream, shared or per sample
    far = torch.tensor([[0, 30], [1, 2]], device=device)
    close(dynamic(x[:, :2], x[:, :2], x[:, :2], q_positions=far, k_positions=far)[0],
          rope_reference(dynamic, x[:, :2], x[:, :2], x[:, :2], q_positions=far, k_positions=far)[0])


def test_dynamic_decoding_is_exact_below_the_original_length_and_refused_past_it(device):
    "Decoding a dynamic layer equals recomputation up to its original length; a step reaching it is refused."
    layer = _scaled(device, 'dynamic')
    x = torch.randn(2, 10, 32, dtype=DTYPE, device=device)
    want = rope_reference(layer, x[:, :8], x[:, :8], x[:, :8], attn_mask=causal_mask(8, 8, device))[0]
    cache = layer.init_cache(2, 10)
    got = [layer(x[:, :5], x[:, :5], x[:, :5], cache=cache, is_causal=True)[0]]
    got += [layer(t, t, t, cache=cache)[0] for t in x[:, 5:8].split(1, dim=1)]
    close(torch.cat(got, dim=1), want)
    with pytest.raises(ValueError, match=r"decoding step 4 would reach position 9: rope_scaling 'dynamic' turns by the "
                                         r"plain frequencies below original_max_position_embeddings=8"):
        layer(x[:, 8:], x[:, 8:], x[:, 8:], cache=cache, is_causal=True)
    assert cache.length == 8
    cache = layer.init_cache(2, 10)  # given positions are read
    with pytest.raises(ValueError, match=r"decoding step 0 would reach position 8"):
        layer(x[:, :1], x[:, :1], x[:, :1], cache=cache, k_positions=torch.tensor([8], device=device))
    other = _scaled(device, 'yarn')  # the other types decode past the original length
    cache = other.init_cache(2, 10)
    got = [other(t, t, t, cache=cache)[0] for t in x.split(1, dim=1)]
    close(torch.cat(got, dim=1), rope_reference(other, x, x, x, attn_mask=causal_mask(10, 10, device))[0])


@pytest.mark.slow
def test_dynamic_frequencies_compile_to_one_graph():
    "The dynamic frequencies are torch operators on the positions: one graph, no value read back."
    torch._dynamo.reset()
    layer = _scaled('cpu', 'dynamic').float()
    x, p = torch.randn(2, 12, 32), torch.randint(0, 40, (2, 12))
    compiled = torch.compile(layer, fullgraph=True)
    for positions in (p, p + 100):
        got = compiled(x, x, x, q_positions=positions, k_positions=positions, is_causal=True)[0]
        want = layer(x, x, x, q_positions=positions, k_positions=positions, is_causal=True)[0]
        assert (got - want).abs().max() < 1e-5


def test_the_factories_pass_the_options():
    scaling = dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=128)
    layer = positional_attention('rotary', 32, 4, rope_scaling=scaling, rotary_dim=4)
    assert layer.rope_scaling == check_rope_scaling(scaling) and layer.rotary_dim == 4
    model = PosTransformerLM(11, 32, 4, 2, attention='rotary', rope_scaling=scaling)
    plain = PosTransformerLM(11, 32, 4, 2, attention='rotary')
    model.load_state_dict(plain.state_dict()); plain.load_state_dict(model.state_dict())
    rotary = [m for m in model.modules() if isinstance(m, RoPEMultiheadAttention)]
    assert len(rotary) == 2 and all(m.rope_scaling == check_rope_scaling(scaling) for m in rotary)


@pytest.mark.parametrize('scaling, error, message', [
    ('yarn', TypeError, r"rope_scaling must be None or a dict of Hugging Face's rope parameters .*, got str 'yarn'"),
    ({}, ValueError, r"rope_scaling needs the key 'rope_type' \(one of default, linear, dynamic, yarn, llama3\), "
                     r"got keys none"),
    ({'rope_type': 'longrope'}, ValueError, r"rope_scaling\['rope_type'\] must be one of 'default', 'linear', "
                                            r"'dynamic', 'yarn', 'llama3', got 'longrope'"),
    ({'rope_type': 'linear'}, ValueError, r"rope_scaling of rope_type 'linear' needs the key 'factor', got keys "
                                          r"'rope_type'"),
    ({'rope_type': 'dynamic', 'factor': 2.0}, ValueError, r"needs the key 'original_max_position_embeddings'"),
    ({'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 500.0}, ValueError,
     r"unknown key 'rope_theta' for rope_type 'linear' \(the base is the layer's rope_base\): it takes rope_type, "
     r"factor"),
    ({'rope_type': 'linear', 'factor': '2'}, ValueError, r"rope_scaling\['factor'\] must be a real number >= 1, "
                                                         r"got '2'"),
    ({'rope_type': 'linear', 'factor': True}, ValueError, r"rope_scaling\['factor'\] must be a real number >= 1"),
    ({'rope_type': 'linear', 'factor': float('inf')}, ValueError, r"rope_scaling\['factor'\] must be a real number"),
    (dict(rope_type='yarn', factor=2.0, original_max_position_embeddings=64.0), ValueError,
     r"rope_scaling\['original_max_position_embeddings'\] must be an integer >= 1, got 64.0"),
    (dict(rope_type='yarn', factor=2.0, original_max_position_embeddings=64, beta_fast=1, beta_slow=2), ValueError,
     r"rope_scaling\['beta_fast'\] must be greater than rope_scaling\['beta_slow'\], got beta_fast=1.0, beta_slow=2.0"),
    (dict(rope_type='yarn', factor=2.0, original_max_position_embeddings=64, truncate=1), ValueError,
     r"rope_scaling\['truncate'\] must be a bool, got 1"),
    (dict(rope_type='yarn', factor=2.0, original_max_position_embeddings=64, attention_factor=0), ValueError,
     r"rope_scaling\['attention_factor'\] must be a real number > 0, got 0"),
    (dict(rope_type='llama3', factor=8.0, original_max_position_embeddings=64, low_freq_factor=4.0,
          high_freq_factor=1.0), ValueError, r"rope_scaling\['high_freq_factor'\] must be greater than "
                                             r"rope_scaling\['low_freq_factor'\]"),
])
def test_bad_rope_scaling_is_refused(scaling, error, message):
    with pytest.raises(error, match=message): RoPEMultiheadAttention(16, 2, rope_scaling=scaling)


@pytest.mark.parametrize('rotary_dim, error, message', [
    (3, ValueError, r"rotary_dim must be an even integer in \[2, 8\], got 3"),
    (0, ValueError, r"rotary_dim must be an even integer in \[2, 8\], got 0"),
    (10, ValueError, r"rotary_dim must be an even integer in \[2, 8\], got 10"),
    (4.0, TypeError, r"rotary_dim must be None or an int, got float 4.0"),
    (True, TypeError, r"rotary_dim must be None or an int, got bool True")])
def test_bad_rotary_dim_is_refused(rotary_dim, error, message):
    with pytest.raises(error, match=message): RoPEMultiheadAttention(16, 2, rotary_dim=rotary_dim)


def test_partial_rotary_allows_an_odd_head_and_dynamic_needs_four_channels():
    layer = RoPEMultiheadAttention(18, 2, rotary_dim=4, dtype=DTYPE)  # head_dim 9
    x = torch.randn(1, 5, 18, dtype=DTYPE)
    close(layer(x, x, x)[0], rope_reference(layer, x, x, x)[0])
    with pytest.raises(ValueError, match=r"'dynamic' raises the base .* needs rotary_dim >= 4, got 2"):
        RoPEMultiheadAttention(16, 2, rotary_dim=2, rope_scaling=SCALINGS['dynamic'])


def test_normalised_options_and_their_repr():
    yarn = check_rope_scaling(dict(type='yarn', factor=4, original_max_position_embeddings=16))  # HF's old key name
    assert yarn == dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                        beta_slow=1.0, truncate=True)
    assert check_rope_scaling(yarn) == yarn
    layer = RoPEMultiheadAttention(16, 2, rope_scaling=yarn, rotary_dim=4)
    assert repr(layer).splitlines()[1] == f"  embed_dim=16, num_heads=2, rope_base=10000.0, rotary_dim=4, rope_scaling={yarn}"
    assert layer.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    theta = rope_scaled_frequencies(8, 10000.0, None)[0]
    assert torch.equal(theta, rope_frequencies(8, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dynamic', 'yarn'])
def test_compiled_scaled_decoding_does_not_recompile_every_step(name):
    """A scaled layer's decoding step compiles to one graph and at most 3 times for a prompt and 10 tokens, as the
    plain layer's (tests/test_compile.py), 'dynamic' below its original length; it gives the eager outputs."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    scaling = dict(SCALINGS[name], original_max_position_embeddings=16)
    torch.manual_seed(0)
    layer = randomise(RoPEMultiheadAttention(16, 4, dtype=DTYPE, rope_scaling=scaling)).eval()
    counter = CompileCounter()
    step = torch.compile(lambda t, cache: layer(t, t, t, cache=cache, is_causal=True)[0], backend=counter, fullgraph=True)
    compiled_cache, eager_cache = layer.init_cache(2, 12), layer.init_cache(2, 12)
    with torch.no_grad():
        for tokens in torch.randn(2, 12, 16, dtype=DTYPE).split([2] + [1] * 10, dim=1):
            close(step(tokens, compiled_cache), layer(tokens, tokens, tokens, cache=eager_cache, is_causal=True)[0])
    assert counter.frame_count <= 3, counter.frame_count
    torch._dynamo.reset()


# At the floor's memory (issue 22): the heads made by the layer itself, half-split pairs through reordered weights,
# the angles as one operator while compiling.

def _close_to_scale(actual, expected):
    "`close` to 1e-12 of the larger of 1 and the largest expected value (gradients of a sum of squares run to tens)."
    close(actual, expected, eps=1e-12 * max(1.0, expected.abs().max().item()))


def _outputs_and_gradients(layer, query, key, value, fn=None, **kw):
    "The output of `fn` (the layer by default) and the gradients of its squares' sum by the inputs and parameters."
    inputs = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    if key is query: inputs[1] = inputs[0]
    if value is key: inputs[2] = inputs[1]
    if value is query: inputs[2] = inputs[0]
    out = (fn or (lambda *a, **k: layer(*a, **k)[0]))(*inputs, **kw)
    wrt = list(dict.fromkeys(inputs)) + list(layer.parameters())
    return [out, *torch.autograd.grad(out.square().sum(), wrt)]


@pytest.mark.parametrize('interleaved', [True, False])
@pytest.mark.parametrize('rotary_dim', [None, 6])
@pytest.mark.parametrize('name', [None, *SCALINGS])
def test_the_layers_heads_give_the_definition_with_their_gradients(device, interleaved, rotary_dim, name):
    """Outputs and every gradient (inputs, weights, biases) equal the oracle's, in self-attention (one input: two
    products with gradients, one turned in place without) and cross-attention, with per-sample positions and masks."""
    layer = _scaled(device, name, interleaved=interleaved, rotary_dim=rotary_dim)
    x, mem = (torch.randn(2, T, 32, dtype=DTYPE, device=device) for T in (6, 9))
    p = torch.randint(-60, 60, (2, 6), device=device)
    calls = [((x, x, x), dict(is_causal=True)), ((x, x, x), dict(q_positions=p, k_positions=p)),
             ((x, x, x), dict(q_positions=p, k_positions=p.flip(-1), q_position_mask=p > 0)),
             ((x, mem, mem), dict(q_positions=p, k_position_mask=torch.rand(9, device=device) < .5))]
    for args, kw in calls:
        mask = dict(attn_mask=causal_mask(6, 6, device)) if kw.get('is_causal') else {}
        rest = {k: v for k, v in kw.items() if k != 'is_causal'}
        want = _outputs_and_gradients(layer, *args, lambda *a, **k: rope_reference(layer, *a, **k)[0], **rest, **mask)
        for got, expected in zip(_outputs_and_gradients(layer, *args, **kw), want): _close_to_scale(got, expected)
        with torch.no_grad(): close(layer(*args, **kw)[0], want[0])


@pytest.mark.parametrize('interleaved', [True, False])
def test_every_other_projection_gives_the_plain_path_with_its_gradients(device, interleaved):
    """Three weights (kdim, vdim), add_bias_kv (its key joins the heads unturned and not reordered), add_zero_attn, no
    biases: outputs and every gradient equal `project_heads`, `rotate` and `attend_heads` (the plain path)."""
    x, k, v, k12, v10 = (torch.randn(2, T, W, dtype=DTYPE, device=device) for T, W in ((5, 16), (7, 16), (7, 16), (7, 12), (7, 10)))
    for options in (dict(kdim=12, vdim=10), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False)):
        torch.manual_seed(0)
        layer = randomise(RoPEMultiheadAttention(16, 4, dtype=DTYPE, device=device, interleaved=interleaved, **options))
        for args in ([(x, k12, v10)] if 'kdim' in options else [(x, x, x), (x, k, v)]):
            want = _outputs_and_gradients(layer, *args, lambda *a: _plain_path(layer, *a))
            for got, expected in zip(_outputs_and_gradients(layer, *args), want): _close_to_scale(got, expected)
            with torch.no_grad(): close(layer(*args)[0], want[0])


def _plain_path(layer, query, key, value):
    "The layer's output from `project_heads`, `rotate` and `attend_heads` (extra keys appended there)."
    q, k, v = project_heads(layer.attn, query, key, value)
    turn = lambda h: rotate(h, base=layer.rope_base, interleaved=layer.interleaved)
    return attend_heads(layer.attn, turn(q), turn(k), v, mask_dtype=query.dtype)[0]


def test_half_split_pairs_are_reordered_only_within_a_call(device):
    """`forward` may take a half-split layer's query and key channels in `pair_order` (scores unchanged); the heads a
    cache keeps are in the channels' own order, and decoding gives the whole sequence's attention."""
    layer, x, _ = _case(device, interleaved=False)
    q, k, v = project_heads(layer.attn, x, x, x)
    turn = lambda h: rotate(h, base=layer.rope_base, interleaved=False)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = layer.positioned_heads(x, x, x)
            reordered = layer.positioned_heads(x, x, x, reorder=True)
        for a, b in zip(got, (turn(q), turn(k), v)): close(a, b, eps=1e-14)
        order = pair_order(layer.head_dim)
        close(reordered[0], turn(q)[..., order], eps=1e-14); close(reordered[1], turn(k)[..., order], eps=1e-14)
    cache = layer.init_cache(batch_size=3, max_length=6)
    steps = [layer(t, t, t, cache=cache, is_causal=True)[0] for t in x.split([3, 1, 2], dim=1)]
    close(cache.keys[:, :, :6], turn(k))
    close(torch.cat(steps, dim=1), rope_reference(layer, x, x, x, attn_mask=causal_mask(6, 6, device))[0])
    assert torch.equal(layer.pair_rows.cpu(), torch.cat((pair_order(4, 4), pair_order(4, 4) + 16, torch.arange(32, 48))))
    assert RoPEMultiheadAttention(16, 4).pair_rows is None and 'pair_rows' not in layer.state_dict()


def test_without_gradients_the_heads_are_the_floors_views(device):
    "Self-attention without gradients: one packed product turned in place, the heads views of it, as the floor's."
    for interleaved in (True, False):
        layer, x, _ = _case(device, interleaved=interleaved)
        with torch.no_grad(): q, k, v = layer.positioned_heads(x, x, x, reorder=True)
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert q.stride() == (6 * 48, 4, 48, 1) and v.storage_offset() == 32


def _saved_units(module, fn, x):
    "What autograd keeps for backward in one call of `fn` (distinct storages, parameters left out), in `x`'s size."
    params, seen = {p.untyped_storage().data_ptr() for p in module.parameters()}, {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in params: seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): fn()
    return sum(seen.values()) / (x.numel() * x.element_size())


def _floor(attn, x, mem):
    "Attention without positions at its cheapest (`benchmarks/harness.py`'s floor): packed products, the kernel."
    w, b, D, H = attn.in_proj_weight, attn.in_proj_bias, attn.embed_dim, attn.num_heads
    heads = lambda t, n: [h.transpose(1, 2) for h in t.unflatten(-1, (n, H, -1)).unbind(2)]
    if mem is None: q, k, v = heads(F.linear(x, w, b), 3)
    else: (q,), (k, v) = heads(F.linear(x, w[:D], b[:D]), 1), heads(F.linear(mem, w[D:], b[D:]), 2)
    return attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize('rotary_dim', [None, 8])
def test_autograd_keeps_what_attention_without_positions_keeps(rotary_dim):
    """Float32, training: the layer keeps what the floor keeps, plus the angles and, half-split, the query and key
    rows of `W_q`, `W_k` in pair order (`2D²` elements, half a `(B, T, D)` tensor here)."""
    B, T, D, H = 4, 64, 64, 4
    x, mem = torch.randn(B, T, D, requires_grad=True), torch.randn(B, T, D, requires_grad=True)
    for interleaved in (True, False):
        layer = RoPEMultiheadAttention(D, H, interleaved=interleaved, rotary_dim=rotary_dim).train()
        for kv in (None, mem):
            y = x if kv is None else kv
            floor = _saved_units(layer, lambda: _floor(layer.attn, x, kv), x)
            units = _saved_units(layer, lambda: layer(x, y, y)[0], x)
            weights = 0 if interleaved else 2 * D * D / (B * T * D)
            angles = 2 * (D // H) / (B * D)  # e^(iφ), (T, d/2) complex, once or (cross-attention) twice; and the rows
            assert floor + weights <= units <= floor + weights + angles + 0.03, (interleaved, kv is None, units, floor)


@pytest.mark.slow
@pytest.mark.parametrize('options', [dict(), dict(interleaved=False), dict(rotary_dim=2, interleaved=False),
                                     dict(rope_scaling=SCALINGS['yarn'])])
def test_compiled_angles_are_one_operator_of_their_own(options):
    """Compiled whole (`fullgraph=True`), the cosines and sines are the operator `additive_pos_attn::rope_cos_sin`
    (computed once per angle, not in the turning kernel), and the layer gives the eager output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = randomise(RoPEMultiheadAttention(16, 4, dtype=DTYPE, **options))
    x, p = torch.randn(2, 6, 16, dtype=DTYPE), torch.randint(0, 40, (2, 6))
    try:
        explanation = torch._dynamo.explain(layer)(x, x, x, q_positions=p, k_positions=p)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        assert 'rope_cos_sin' in explanation.graphs[0].code
        compiled = torch.compile(layer, fullgraph=True)
        for kw in (dict(q_positions=p, k_positions=p), dict(is_causal=True)):
            for got, want in zip(_outputs_and_gradients(layer, x, x, x, lambda *a, **k: compiled(*a, **k)[0], **kw),
                                 _outputs_and_gradients(layer, x, x, x, **kw)):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    finally:
        torch._dynamo.reset()


def test_a_partial_turn_is_the_plane_rotation_of_its_channels(device):
    "Partial rotary by the complex multiply, the pairs past rotary_dim times exactly 1: the plane rotation, the rest as is."
    x = torch.randn(2, 3, 5, 10, dtype=DTYPE, device=device)
    positions = torch.randint(-50, 50, (2, 5), device=device)
    assert _pairs_as_complex(x, True)
    got = rotate(x, positions, rotary_dim=4)
    close(got[..., :4], _plane_rotation(x[..., :4], positions), eps=1e-14)
    assert torch.equal(got[..., 4:], x[..., 4:])
