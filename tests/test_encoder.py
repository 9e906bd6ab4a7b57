"""`PosTransformerEncoderLayer` exhaustively, on every device, in float64 to 1e-12: against `encoder_reference` for every
kind of positions, position masks and attention masks; against `nn.TransformerEncoderLayer` (via `torch_twin`) for every
mask torch accepts and each activation, with and without bias; the positional keywords reaching the attention; stacked
blocks; gradients. The chapter keeps one or two of each as examples.

The block's parameters also line up with `nn.TransformerEncoderLayer`'s, in the same order, so state dicts and optimiser
states (matched by position) carry over, whatever the activation."""
import copy

import pytest
import torch
from torch import nn

from additive_pos_attn import AdditivePosMultiheadAttention, PosTransformerEncoderLayer
from additive_pos_attn.encoder import encoder_reference, random_block, torch_twin
from additive_pos_attn.positions import causal_mask

DTYPE = torch.float64


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_parameter_order_is_torchs():
    for activation in ('gelu', nn.PReLU()):
        block = PosTransformerEncoderLayer(AdditivePosMultiheadAttention(8, 2, max_len=4), dim_feedforward=16, activation=activation)
        reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=activation, batch_first=True, norm_first=True)
        names = [n for n, _ in block.named_parameters() if not n.startswith('self_attn.')]
        assert names == [n for n, _ in reference.named_parameters() if not n.startswith('self_attn.')], names


def test_block_is_the_definition(device):
    "Shared, reversed and per-sample positions, position masks, an attention mask, padding and is_causal; GELU and ReLU."
    block = random_block(device=device)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    kpm = torch.zeros(3, 6, dtype=torch.bool, device=device); kpm[0, -2:] = True
    cases = [dict(), dict(positions=torch.tensor([5, 4, 3, 2, 1, 0], device=device)),
             dict(positions=torch.randint(0, 20, (3, 6), device=device)),
             dict(position_mask=torch.rand(6, device=device) < 0.5), dict(position_mask=torch.rand(3, 6, device=device) < 0.5),
             dict(positions=torch.arange(10, 16, device=device), src_mask=causal_mask(6, 6, device)),
             dict(src_key_padding_mask=kpm, position_mask=~kpm)]
    for kw in cases:
        expected = encoder_reference(block, x, positions=kw.get('positions'), position_mask=kw.get('position_mask'),
                                     attn_mask=kw.get('src_mask'), key_padding_mask=kw.get('src_key_padding_mask'))
        _close(block(x, **kw), expected)
    _close(block(x, is_causal=True), encoder_reference(block, x, attn_mask=causal_mask(6, 6, device)))
    relu_block = random_block(activation='relu', device=device)
    shifted = torch.arange(6, device=device) + 3
    _close(relu_block(x, positions=shifted), encoder_reference(relu_block, x, positions=shifted))


@pytest.mark.parametrize('activation, bias', [('gelu', True), ('relu', True), (torch.tanh, True), ('gelu', False)],
                         ids=['gelu', 'relu', 'callable', 'no bias'])
def test_zero_table_is_torchs_layer(device, activation, bias):
    "With a zero table, every mask torch accepts gives what `nn.TransformerEncoderLayer` gives with the same weights."
    torch.manual_seed(1)
    block = PosTransformerEncoderLayer(AdditivePosMultiheadAttention(16, 4, max_len=8, bias=bias, dtype=DTYPE, device=device),
                                       24, dropout=0.0, activation=activation, bias=bias, dtype=DTYPE, device=device).eval()
    twin = torch_twin(block)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    kpm = torch.zeros(3, 6, dtype=torch.bool, device=device); kpm[1, -3:] = True
    causal = causal_mask(6, 6, device)
    masks = [dict(), dict(src_mask=causal), dict(src_mask=torch.randn(6, 6, dtype=DTYPE, device=device)),
             dict(src_key_padding_mask=kpm), dict(src_mask=causal, src_key_padding_mask=kpm, is_causal=True)]
    for kw in masks: _close(block(x, **kw), twin(x, **kw))
    # is_causal alone, which torch needs spelled out as a mask
    _close(block(x, is_causal=True), twin(x, src_mask=causal, is_causal=True))


def test_positional_keywords_reach_the_attention(device):
    "An all-False position mask is a zero table, default positions are arange(T), per-sample positions act sample by sample."
    block = random_block(device=device)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    zero_table = copy.deepcopy(block)
    with torch.no_grad(): zero_table.self_attn.pos_emb.zero_()
    _close(block(x, position_mask=torch.zeros(6, dtype=torch.bool, device=device)), zero_table(x))
    assert not torch.allclose(block(x), zero_table(x))
    in_order = torch.arange(6, device=device)
    _close(block(x, positions=in_order), block(x))
    assert not torch.allclose(block(x, positions=in_order.flip(0)), block(x))
    per_sample = torch.stack([torch.randperm(20, device=device)[:6] for _ in range(3)])
    out = block(x, positions=per_sample)
    for b in range(3): _close(out[b], block(x[b:b + 1], positions=per_sample[b])[0])


def _stack(device, num_layers=2):
    "Deep copies of one `random_block`, as a model stacks them, each with its own table."
    block = random_block(device=device)
    layers = nn.ModuleList(copy.deepcopy(block) for _ in range(num_layers))
    assert layers[0].self_attn.pos_emb.data_ptr() != layers[1].self_attn.pos_emb.data_ptr()
    return layers


def test_stacked_blocks_are_the_definition_in_turn(device):
    layers = _stack(device)
    x, positions = torch.randn(2, 6, 16, dtype=DTYPE, device=device), torch.tensor([2, 3, 4, 5, 6, 7], device=device)
    out, expected = x, x
    for layer in layers:
        out = layer(out, positions=positions, is_causal=True)
        expected = encoder_reference(layer, expected, positions=positions, attn_mask=causal_mask(6, 6, device))
    _close(out, expected)


def test_gradients_reach_every_parameter(device):
    layers = _stack(device).train()
    x = torch.randn(2, 6, 16, dtype=DTYPE, device=device, requires_grad=True)
    out = x
    for layer in layers: out = layer(out, positions=torch.arange(6, device=device) + 1)
    out.pow(2).sum().backward()
    for name, param in layers.named_parameters(): assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
