"""`PosTransformerEncoderLayer` exhaustively, around each of the positional layers, on every device, in float64 to
1e-12: against `encoder_reference` for every kind of positions, position masks and attention masks; against
`nn.TransformerEncoderLayer` (via `torch_twin`) for every mask torch accepts and each activation, with and without bias
(zero positional parameters; zero ALiBi slopes; for rotary, every position mask False); the positional keywords reaching the attention;
stacked blocks; gradients. The chapter keeps one or two of each as examples.

The block's parameters also line up with `nn.TransformerEncoderLayer`'s, in the same order, so state dicts and optimiser
states (matched by position) carry over, whatever the activation."""
import copy

import pytest
import torch
from torch import nn

from additive_pos_attn import AdditivePosMultiheadAttention, PosTransformerEncoderLayer
from additive_pos_attn.additive import additive_reference
from additive_pos_attn.base import PositionalAttentionBase
from additive_pos_attn.blocks import ATTENTION_KINDS, positional_attention, positional_parameters
from additive_pos_attn.encoder import encoder_reference
from additive_pos_attn.testing import random_block, torch_twin
from additive_pos_attn.positions import causal_mask
from cases import DTYPE, close

KINDS = pytest.mark.parametrize('kind', ATTENTION_KINDS)



def test_parameter_order_is_torchs():
    for activation in ('gelu', nn.PReLU()):
        block = PosTransformerEncoderLayer(AdditivePosMultiheadAttention(8, 2, max_len=4), dim_feedforward=16, activation=activation)
        reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=activation, batch_first=True, norm_first=True)
        names = [n for n, _ in block.named_parameters() if not n.startswith('self_attn.')]
        assert names == [n for n, _ in reference.named_parameters() if not n.startswith('self_attn.')], names


@KINDS
@pytest.mark.filterwarnings('ignore:Support for mismatched key_padding_mask:UserWarning')  # torch's note on relative_reference's masks
def test_block_is_the_definition(device, kind):
    "Shared, reversed and per-sample positions, position masks, an attention mask, padding and is_causal; GELU and ReLU."
    block = random_block(attention=kind, device=device)
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
        close(block(x, **kw), expected)
    close(block(x, is_causal=True), encoder_reference(block, x, attn_mask=causal_mask(6, 6, device)))
    relu_block = random_block(attention=kind, activation='relu', device=device)
    shifted = torch.arange(6, device=device) + 3
    close(relu_block(x, positions=shifted), encoder_reference(relu_block, x, positions=shifted))


@KINDS
@pytest.mark.parametrize('activation, bias', [('gelu', True), ('relu', True), (torch.tanh, True), ('gelu', False)],
                         ids=['gelu', 'relu', 'callable', 'no bias'])
def test_zero_table_is_torchs_layer(device, kind, activation, bias):
    """With zero positional parameters (a fresh layer), every mask torch accepts gives what `nn.TransformerEncoderLayer`
    gives with the same weights; a rotary block does so with every position mask False, where no token is turned, and
    an ALiBi block with zero slopes."""
    torch.manual_seed(1)
    zero = dict(slopes=torch.zeros(4)) if kind == 'alibi' else {}
    block = PosTransformerEncoderLayer(positional_attention(kind, 16, 4, max_len=8, bias=bias, dtype=DTYPE, device=device, **zero),
                                       24, dropout=0.0, activation=activation, bias=bias, dtype=DTYPE, device=device).eval()
    twin = torch_twin(block)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    kpm = torch.zeros(3, 6, dtype=torch.bool, device=device); kpm[1, -3:] = True
    causal = causal_mask(6, 6, device)
    off = dict(position_mask=torch.zeros(6, dtype=torch.bool, device=device)) if kind == 'rotary' else {}
    masks = [dict(), dict(src_mask=causal), dict(src_mask=torch.randn(6, 6, dtype=DTYPE, device=device)),
             dict(src_key_padding_mask=kpm), dict(src_mask=causal, src_key_padding_mask=kpm, is_causal=True)]
    for kw in masks: close(block(x, **kw, **off), twin(x, **kw))
    # is_causal alone, which torch needs spelled out as a mask
    close(block(x, is_causal=True, **off), twin(x, src_mask=causal, is_causal=True))


def test_rotary_is_not_torchs_layer_at_its_default_positions():
    "Rotary angles are not zero at positions 1, 2, ...: without a mask the fresh rotary block is not its twin; at one position it is."
    torch.manual_seed(1)
    block = PosTransformerEncoderLayer(positional_attention('rotary', 16, 4, max_len=8, dtype=DTYPE), 24, dropout=0.0, dtype=DTYPE).eval()
    x = torch.randn(3, 6, 16, dtype=DTYPE)
    assert not torch.allclose(block(x), torch_twin(block)(x))
    close(block(x, positions=torch.full((6,), 5)), torch_twin(block)(x))  # equal positions: every offset is zero


@pytest.mark.parametrize('kind, name', [('additive', 'self_attn.pos_emb'), ('relative', 'self_attn.rel_bias')])
def test_torch_twin_refuses_positional_parameters_it_would_drop(kind, name):
    block = random_block(attention=kind)
    with pytest.raises(ValueError, match=rf"torch_twin leaves out the positional parameters, so they must be zero: {name} is not"):
        torch_twin(block)
    with torch.no_grad():
        for p in positional_parameters(block.self_attn).values(): p.zero_()
    torch_twin(block)  # zeroed, it is accepted


def test_positional_parameters_are_those_beside_attn():
    names = {kind: list(positional_parameters(positional_attention(kind, 8, 2, max_len=4))) for kind in ATTENTION_KINDS}
    assert names == {'additive': ['pos_emb'], 'relative': ['rel_bias'], 'rotary': [], 'alibi': []}  # ALiBi's slopes: a buffer


def test_positional_attention_builds_each_kind():
    additive, relative, rotary, alibi = (positional_attention(kind, 8, 2, max_len=5, batch_first=False, dropout=0.1) for kind in ATTENTION_KINDS)
    assert (type(additive).__name__, additive.max_len, additive.pos_emb.shape) == ('AdditivePosMultiheadAttention', 5, (5, 8))
    assert (type(relative).__name__, relative.max_distance, relative.max_len) == ('AdditiveRelMultiheadAttention', 4, None)
    assert (type(rotary).__name__, rotary.max_len) == ('RoPEMultiheadAttention', None)
    assert (type(alibi).__name__, alibi.max_len, alibi.slopes.tolist()) == ('ALiBiMultiheadAttention', None, [2 ** -4, 2 ** -8])
    assert all(not layer.batch_first and layer.attn.dropout == 0.1 for layer in (additive, relative, rotary, alibi))
    assert positional_attention('relative', 8, 2, max_len=5, max_distance=2).max_distance == 2  # given, it wins
    assert positional_attention('relative', 8, 2, max_distance=3).max_distance == 3  # then max_len may be left out
    assert positional_attention('alibi', 8, 2, slopes=[0.0, 0.0]).slopes.tolist() == [0.0, 0.0]
    assert positional_attention('relative', 8, 2, max_len=1).max_distance == 1  # a one-token model still gets a bias row each side
    with pytest.raises(ValueError, match=r"kind must be one of 'additive', 'relative', 'rotary', 'alibi', got 'none'"):
        positional_attention('none', 8, 2, max_len=4)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got 0"): positional_attention('rotary', 8, 2, max_len=0)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got 0"): positional_attention('alibi', 8, 2, max_len=0)
    with pytest.raises(ValueError, match=r"max_len is required for 'relative' attention \(a row for each offset, max_len - 1 of "
                                         r"them, unless max_distance is given\), got None"):
        positional_attention('relative', 8, 2)


def test_encoder_reference_takes_a_named_oracle_and_refuses_an_unknown_layer():
    block = random_block()
    x = torch.randn(2, 5, 16, dtype=DTYPE)
    assert torch.equal(encoder_reference(block, x, attention_reference=additive_reference), encoder_reference(block, x))

    class Unknown(PositionalAttentionBase):
        def forward(self, query, key, value, **kwargs): return query, None

    block = PosTransformerEncoderLayer(Unknown(16, 4, max_len=None), 24, dropout=0.0, dtype=DTYPE).eval()
    with pytest.raises(TypeError, match=r"encoder_reference knows no oracle for Unknown: pass attention_reference"):
        encoder_reference(block, x)
    close(encoder_reference(block, x, attention_reference=lambda layer, q, k, v, **kw: (q, None)), block(x))


def test_one_seed_gives_one_block_but_for_the_scheme(device):
    "`random_block` of each scheme shares every weight but the positional ones; switched off, all are torch's layer."
    blocks = {kind: random_block(attention=kind, device=device) for kind in ATTENTION_KINDS}
    # all but the attention's own entries beside its attn: positional parameters, ALiBi's slopes buffer
    shared = lambda block: {k: v for k, v in block.state_dict().items() if not k.startswith('self_attn.') or k.startswith('self_attn.attn.')}
    for kind in ATTENTION_KINDS[1:]:
        assert shared(blocks[kind]).keys() == shared(blocks['additive']).keys()
        for name, value in shared(blocks['additive']).items(): assert torch.equal(shared(blocks[kind])[name], value), (kind, name)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    off = torch.zeros(6, dtype=torch.bool, device=device)
    zeroed = copy.deepcopy(blocks['additive'])
    with torch.no_grad(): zeroed.self_attn.pos_emb.zero_()
    for block in blocks.values(): close(block(x, position_mask=off), torch_twin(zeroed)(x))


@KINDS
def test_positional_keywords_reach_the_attention(device, kind):
    """An all-False position mask is torch's layer with zero positional parameters, default positions are arange(T),
    per-sample positions act sample by sample."""
    block = random_block(attention=kind, device=device)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    zeroed = copy.deepcopy(block)
    with torch.no_grad():
        for p in positional_parameters(zeroed.self_attn).values(): p.zero_()
    without_positions = torch_twin(zeroed)(x)
    close(block(x, position_mask=torch.zeros(6, dtype=torch.bool, device=device)), without_positions)
    assert not torch.allclose(block(x), without_positions)
    in_order = torch.arange(6, device=device)
    close(block(x, positions=in_order), block(x))
    # a swap, not the reversal, which changes no distance |p_i - p_j| (ALiBi's bias)
    assert not torch.allclose(block(x, positions=in_order[[1, 0, 2, 3, 4, 5]]), block(x))
    per_sample = torch.stack([torch.randperm(20, device=device)[:6] for _ in range(3)])
    out = block(x, positions=per_sample)
    for b in range(3): close(out[b], block(x[b:b + 1], positions=per_sample[b])[0])


def _stack(device, kind, num_layers=2):
    "Deep copies of one `random_block`, as a model stacks them, each with its own positional parameters."
    block = random_block(attention=kind, device=device)
    layers = nn.ModuleList(copy.deepcopy(block) for _ in range(num_layers))
    for (_, p), (_, q) in zip(*(positional_parameters(layer.self_attn).items() for layer in layers)): assert p.data_ptr() != q.data_ptr()
    return layers


@KINDS
def test_stacked_blocks_are_the_definition_in_turn(device, kind):
    layers = _stack(device, kind)
    x, positions = torch.randn(2, 6, 16, dtype=DTYPE, device=device), torch.tensor([2, 3, 4, 5, 6, 7], device=device)
    out, expected = x, x
    for layer in layers:
        out = layer(out, positions=positions, is_causal=True)
        expected = encoder_reference(layer, expected, positions=positions, attn_mask=causal_mask(6, 6, device))
    close(out, expected)


@KINDS
def test_gradients_reach_every_parameter(device, kind):
    layers = _stack(device, kind).train()
    x = torch.randn(2, 6, 16, dtype=DTYPE, device=device, requires_grad=True)
    out = x
    for layer in layers: out = layer(out, positions=torch.arange(6, device=device) + 1)
    out.pow(2).sum().backward()
    for name, param in layers.named_parameters(): assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
