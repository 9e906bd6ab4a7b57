"""The encoder block's parameters line up with `nn.TransformerEncoderLayer`'s, in the same order, so state dicts
and optimiser states (matched by position) carry over, whatever the activation."""
import torch
from torch import nn

from additive_pos_attn import AdditivePosMultiheadAttention, PosTransformerEncoderLayer


def test_parameter_order_is_torchs():
    for activation in ('gelu', nn.PReLU()):
        block = PosTransformerEncoderLayer(AdditivePosMultiheadAttention(8, 2, max_len=4), dim_feedforward=16, activation=activation)
        reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=activation, batch_first=True, norm_first=True)
        names = [n for n, _ in block.named_parameters() if not n.startswith('self_attn.')]
        assert names == [n for n, _ in reference.named_parameters() if not n.startswith('self_attn.')], names
