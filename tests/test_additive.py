"""`AdditivePosMultiheadAttention` exhaustively, on every device, in float64 to 1e-12: against its own `attn` with a zero
table, against `additive_reference` for every kind of positions, position masks and attention masks, gradients (with
`gradcheck`), sequence-first inputs, lower precisions, and initial tables. The chapter keeps a few of each as
examples; refusals are in `tests/test_properties.py`."""
import copy

import pytest
import torch
from torch.func import functional_call

from additive_pos_attn.additive import AdditivePosMultiheadAttention, additive_reference
from additive_pos_attn.positions import causal_mask, sinusoidal_table
from additive_pos_attn.testing import random_case
from cases import DTYPE, check_is_its_attn, close, position_kinds, stream




def test_zero_table_is_the_wrapped_module(device):
    torch.manual_seed(0)
    check_is_its_attn(AdditivePosMultiheadAttention(16, 4, max_len=12, dtype=DTYPE, device=device), device)


def test_every_kind_of_positions_matches_the_definition(device):
    layer, x, mem = random_case(device)
    for kv in (x, mem):
        for qk in position_kinds(3, 6, 20, device):
            for kk in position_kinds(3, kv.shape[1], 20, device):
                kw = {**stream('q', qk), **stream('k', kk)}
                out, w = layer(x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                ref, ref_w = additive_reference(layer, x, kv, kv, need_weights=True, average_attn_weights=False, **kw)
                close(out, ref); close(w, ref_w)
                close(layer(x, kv, kv, **kw)[0], ref)  # the fused path, without weights
    kw = dict(q_positions=torch.tensor([5, 4, 3, 2, 1, 0], device=device), attn_mask=causal_mask(6, 9, device))
    close(layer(x, mem, mem, is_causal=True, **kw)[0], additive_reference(layer, x, mem, mem, is_causal=True, **kw)[0])


def test_position_masks_switch_positions_off(device):
    layer, x, _ = random_case(device)
    off = torch.zeros(6, dtype=torch.bool, device=device)
    close(layer(x, x, x, q_position_mask=off, k_position_mask=off)[0], layer.attn(x, x, x)[0])
    per_sample = torch.ones(3, 6, dtype=torch.bool, device=device); per_sample[1] = False
    out = layer(x, x, x, q_position_mask=per_sample, k_position_mask=per_sample)[0]
    close(out[0], layer(x[:1], x[:1], x[:1])[0][0])
    close(out[1], layer.attn(x[1:2], x[1:2], x[1:2])[0][0])


def test_only_used_rows_get_gradients(device):
    layer, x, mem = random_case(device)
    qp, kp = torch.tensor([0, 2, 4, 6, 8, 10], device=device), torch.tensor([[1, 3, 5, 7, 9, 11, 13, 15, 17]] * 3, device=device)
    kmask = torch.ones(3, 9, dtype=torch.bool, device=device); kmask[:, -1] = False  # row 17 is masked out everywhere
    layer(x, mem, mem, q_positions=qp, k_positions=kp, k_position_mask=kmask)[0].sum().backward()
    used = torch.zeros(20, dtype=torch.bool); used[[0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11, 13, 15]] = True
    assert torch.equal((layer.pos_emb.grad.abs().sum(-1) > 0).cpu(), used)


def test_gradcheck(device):
    layer, x, mem = random_case(device, B=2, Tq=3, Tk=4, D=8, H=2, max_len=6)
    qp, km = torch.tensor([5, 0, 2], device=device), torch.tensor([True, False, True, True], device=device)
    def f(q, k, v, E):
        return functional_call(layer, {**dict(layer.named_parameters()), 'pos_emb': E}, (q, k, v),
                               dict(q_positions=qp, k_position_mask=km, is_causal=True))[0]
    assert torch.autograd.gradcheck(f, [t.detach().clone().requires_grad_() for t in (x, mem, mem, layer.pos_emb)])


def test_sequence_first_is_the_batch_first_layer(device):
    layer, x, mem = random_case(device)
    seq_first = AdditivePosMultiheadAttention(16, 4, max_len=20, dtype=DTYPE, device=device, batch_first=False)
    seq_first.load_state_dict(layer.state_dict())
    kw = dict(q_positions=torch.randint(0, 20, (3, 6), device=device), k_position_mask=torch.rand(9, device=device) < 0.5,
              key_padding_mask=torch.tensor([[False] * 9, [False] * 7 + [True] * 2, [False] * 9], device=device), need_weights=True)
    out, w = seq_first(x.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1), **kw)
    ref, ref_w = layer(x, mem, mem, **kw)
    assert out.shape == (6, 3, 16)
    close(out.transpose(0, 1), ref); close(w, ref_w)
    positions = dict(q_positions=kw['q_positions'], k_positions=kw['q_positions'])
    xt = x.transpose(0, 1).contiguous().requires_grad_()  # self-attention, as a sequence-first model passes it
    out = seq_first(xt, xt, xt, **positions)[0]
    close(out.transpose(0, 1), layer(x, x, x, **positions)[0])
    out.square().sum().backward()
    x.requires_grad_()
    close(xt.grad.transpose(0, 1), torch.autograd.grad(layer(x, x, x, **positions)[0].square().sum(), x)[0])
    with pytest.raises(ValueError, match=r"q_positions must have shape \(6,\) or \(3, 6\), got \(6, 3\)"):
        seq_first(xt, xt, xt, q_positions=torch.zeros(6, 3, dtype=torch.long, device=device))


@pytest.mark.parametrize('dtype, eps', [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])  # relative to the largest output
def test_lower_precisions_follow_the_float64_definition(device, dtype, eps):
    layer, x, mem = random_case(device)
    qp = torch.tensor([3, 1, 4, 1, 5, 9], device=device)
    ref = additive_reference(layer, x, mem, mem, q_positions=qp)[0]
    out = copy.deepcopy(layer).to(dtype)(x.to(dtype), mem.to(dtype), mem.to(dtype), q_positions=qp)[0]
    assert out.dtype == dtype
    close(out.double().detach(), ref.detach(), eps * ref.abs().max().item())


@pytest.mark.parametrize('init', ['zeros', 'normal', 'sinusoidal'])
def test_initial_tables_and_reset(init):
    torch.manual_seed(0)
    layer = AdditivePosMultiheadAttention(64, 4, max_len=512, init=init)
    start = layer.pos_emb.detach().clone()
    with torch.no_grad(): layer.pos_emb.add_(1.0)
    layer.reset_parameters()
    if init == 'normal': assert abs(layer.pos_emb.std().item() - 0.02) < 1e-3
    else: assert torch.equal(layer.pos_emb.detach(), start)
    if init == 'sinusoidal': close(layer.pos_emb.detach(), sinusoidal_table(512, 64), 1e-7)
    assert layer.init == init and (f"init='{init}'" in repr(layer)) == (init != 'zeros')


def test_constructor_options():
    assert AdditivePosMultiheadAttention(16, 4, max_len=8, dropout=0.25).attn.dropout == 0.25
    assert AdditivePosMultiheadAttention(16, 4, max_len=8, dtype=DTYPE).pos_emb.dtype == DTYPE
    assert AdditivePosMultiheadAttention(16, 4, max_len=8, device='meta').pos_emb.is_meta
    layer = AdditivePosMultiheadAttention(16, 4, max_len=32)
    assert (layer.embed_dim, layer.num_heads, layer.max_len, layer.head_dim) == (16, 4, 32, 4)
    assert [n for n, _ in layer.named_parameters()] == ['pos_emb', 'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias']
    cases = [(ValueError, r"max_len must be a positive int, got 0", dict(max_len=0)),
             (ValueError, r"max_len must be a positive int, got -1", dict(max_len=-1)),
             (ValueError, r"embed_dim must be divisible by num_heads, got embed_dim=16, num_heads=3", dict(num_heads=3, max_len=8)),
             (ValueError, r"init must be one of \('zeros', 'normal', 'sinusoidal'\), got 'uniform'", dict(max_len=8, init='uniform'))]
    for error, message, kw in cases:
        with pytest.raises(error, match=message): AdditivePosMultiheadAttention(16, kw.pop('num_heads', 4), **kw)
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: .max_len."): AdditivePosMultiheadAttention(16, 4)


def test_ensembles_under_vmap(device):
    "`torch.func.vmap` over `stack_module_state` of two layers: each member computes the definition."
    layer, x, _ = random_case(device)
    other = copy.deepcopy(layer)
    with torch.no_grad(): other.pos_emb.mul_(-2)
    params, buffers = torch.func.stack_module_state([layer, other])
    out = torch.func.vmap(lambda p, b: functional_call(layer, (p, b), (x, x, x), dict(is_causal=True))[0])(params, buffers)
    for member, result in zip((layer, other), out):
        close(result, additive_reference(member, x, x, x, attn_mask=causal_mask(6, 6, device))[0])
