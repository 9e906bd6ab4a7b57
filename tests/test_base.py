"""Every check of the base class, with its message (the chapter keeps a few of each as examples)."""

import pytest
import torch
from fastcore.test import test_eq as _eq  # under another name, or pytest collects it

from additive_pos_attn.base import PositionalAttentionBase
from additive_pos_attn.checks import (check_attention_inputs, check_attention_masks, check_bool, check_position_mask,
                                      check_positions, check_positive_int)

cpu = torch.device('cpu')


class _Identity(PositionalAttentionBase):
    def forward(self, query, key, value, **kwargs): return query, None


def test_sizes_and_flags():
    _eq(check_positive_int('max_len', 8), 8)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got 0"): check_positive_int('max_len', 0)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got -3"): check_positive_int('max_len', -3)
    with pytest.raises(TypeError, match=r"num_heads must be an int, got float 2.0"): check_positive_int('num_heads', 2.0)
    with pytest.raises(TypeError, match=r"num_heads must be an int, got bool True"): check_positive_int('num_heads', True)
    _eq(check_bool('need_weights', False), False)
    with pytest.raises(TypeError, match=r"need_weights must be a bool, got int 1"): check_bool('need_weights', 1)


def test_attention_inputs():
    x, mem = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    _eq(check_attention_inputs(x, x, x, 8), (2, 5, 5))
    _eq(check_attention_inputs(x, mem, mem, 8), (2, 5, 7))
    with pytest.raises(ValueError, match=r"query must be 3-D \(B, T, D\) \(or, unbatched, 2-D \(T, D\)\), got shape \(5, 8\)"): check_attention_inputs(x[0], x, x, 8)
    with pytest.raises(ValueError, match=r"key must have last dimension embed_dim=8, got shape \(2, 7, 4\)"):
        check_attention_inputs(x, mem[..., :4], mem, 8)
    with pytest.raises(ValueError, match=r"must share the batch size.*value \(1, 7, 8\)"): check_attention_inputs(x, mem, mem[:1], 8)
    with pytest.raises(ValueError, match=r"key and value must have the same length"): check_attention_inputs(x, mem, x, 8)
    with pytest.raises(TypeError, match=r"value must be a floating-point Tensor, got dtype torch.int64"): check_attention_inputs(x, x, x.long(), 8)
    with pytest.raises(TypeError, match=r"query must be a Tensor, got list"): check_attention_inputs([1.0], x, x, 8)
    with pytest.raises(TypeError, match=r"must share dtype and device"): check_attention_inputs(x, x.double(), x.double(), 8)
    _eq(check_attention_inputs(x.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1), 8, batch_first=False), (2, 5, 7))
    with pytest.raises(ValueError, match=r"key and value must have the same length.*\(T, B, D\)"):
        check_attention_inputs(x.transpose(0, 1), mem.transpose(0, 1), x.transpose(0, 1), 8, batch_first=False)


def test_positions():
    cpu = torch.device('cpu')
    kw = dict(name='q_positions', batch=2, length=4, max_len=10, device=cpu)
    p = torch.tensor([3, 4, 5, 6])
    assert check_positions(p, **kw) is p
    assert check_positions(None, **kw) is None
    _eq(check_positions(torch.arange(8).view(2, 4), **kw), torch.arange(8).view(2, 4))
    _eq(check_positions(torch.tensor([0, 9, 9, 0], dtype=torch.int32), **kw).dtype, torch.int32)
    with pytest.raises(ValueError, match=r"q_positions must lie in \[0, max_len=10\), got values from -1 to 2"):
        check_positions(torch.tensor([-1, 0, 1, 2]), **kw)
    with pytest.raises(ValueError, match=r"q_positions must lie in \[0, max_len=10\), got values from 0 to 10"):
        check_positions(torch.tensor([0, 1, 2, 10]), **kw)
    with pytest.raises(TypeError, match=r"q_positions must be an integer Tensor \(int64, int32, int16, int8 or uint8\), got dtype torch.float32"):
        check_positions(p.float(), **kw)
    for dtype in (torch.bool, torch.uint32, torch.complex64):
        with pytest.raises(TypeError, match=f"q_positions must be an integer Tensor.*got dtype {dtype}"): check_positions(p.to(dtype), **kw)
    with pytest.raises(TypeError, match=r"q_positions must be an integer Tensor, got list"): check_positions([0, 1, 2, 3], **kw)
    with pytest.raises(ValueError, match=r"q_positions must have shape \(4,\) or \(2, 4\), got \(3,\)"): check_positions(p[:3], **kw)
    with pytest.raises(ValueError, match=r"got \(3, 4\)"): check_positions(torch.zeros(3, 4, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match=r"got \(1, 2, 4\)"): check_positions(torch.zeros(1, 2, 4, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match=r"sequence length for q_positions is 11, which exceeds max_len=10"):
        check_positions(None, **{**kw, 'length': 11})


def test_position_mask():
    kw = dict(name='q_positions', batch=2, length=4, max_len=10, device=cpu)
    p = torch.tensor([3, 4, 5, 6])
    mkw = dict(name='q_position_mask', batch=2, length=4, device=cpu)
    m = torch.tensor([True, True, False, False])
    assert check_position_mask(m, positions=None, **mkw) is m
    assert check_position_mask(m.expand(2, 4), positions=None, **mkw) is not None
    assert check_position_mask(m, positions=p, **mkw) is m
    with pytest.raises(ValueError, match=r"q_position_mask must have the shape of its positions \(4,\), got \(2, 4\)"):
        check_position_mask(m.expand(2, 4), positions=p, **mkw)
    with pytest.raises(TypeError, match=r"q_position_mask must be a bool Tensor, got dtype torch.int64"): check_position_mask(m.long(), positions=None, **mkw)
    with pytest.raises(ValueError, match=r"q_position_mask must have shape \(4,\) or \(2, 4\), got \(5,\)"):
        check_position_mask(torch.ones(5, dtype=torch.bool), positions=None, **mkw)


def test_attention_masks():
    akw = dict(batch=2, num_heads=4, q_len=3, k_len=5, dtype=torch.float32, device=cpu)
    check_attention_masks(torch.zeros(3, 5, dtype=torch.bool), torch.zeros(2, 5), **akw)
    check_attention_masks(torch.zeros(8, 3, 5), None, **akw)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(3, 5\) or \(8, 3, 5\), got \(5, 3\)"):
        check_attention_masks(torch.zeros(5, 3), None, **akw)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\), got \(2, 3\)"):
        check_attention_masks(None, torch.zeros(2, 3, dtype=torch.bool), **akw)
    with pytest.raises(TypeError, match=r"key_padding_mask must be bool or of the query's dtype torch.float32, got dtype torch.int64"):
        check_attention_masks(None, torch.zeros(2, 5, dtype=torch.long), **akw)


def test_base_class():
    with pytest.raises(TypeError, match="abstract"): PositionalAttentionBase(8, 2, max_len=4)

    layer = _Identity(8, 2, max_len=16)
    _eq((layer.embed_dim, layer.num_heads, layer.head_dim, layer.max_len, layer.batch_first), (8, 2, 4, 16, True))
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads, got embed_dim=10, num_heads=4"): _Identity(10, 4, max_len=4)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got 0"): _Identity(8, 2, max_len=0)
    with pytest.raises(TypeError, match=r"max_len must be an int, got float 4.0"): _Identity(8, 2, max_len=4.0)
    with pytest.raises(TypeError, match=r"batch_first must be a bool, got str"): _Identity(8, 2, max_len=4, batch_first='yes')


def test_check_inputs():
    layer = _Identity(8, 2, max_len=16)
    x = torch.randn(2, 5, 8)
    _eq(layer.check_inputs(x, x, x), (2, 5, 5))
    _eq(layer.check_inputs(x, x[:, :3], x[:, :3], k_positions=torch.tensor([15, 0, 7])), (2, 5, 3))
    with pytest.raises(ValueError, match=r"k_positions must lie in \[0, max_len=16\), got values from 0 to 16"):
        layer.check_inputs(x, x, x, k_positions=torch.tensor([0, 1, 2, 3, 16]))
    with pytest.raises(ValueError, match=r"sequence length for q_positions is 17"): layer.check_inputs(*[torch.randn(1, 17, 8)] * 3)
    with pytest.raises(ValueError, match=r"k_position_mask must have shape \(5,\) or \(2, 5\), got \(3, 5\)"):
        layer.check_inputs(x, x, x, k_position_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"is_causal must be a bool, got float 1.5"): layer.check_inputs(x, x, x, is_causal=1.5, need_weights=False)




def test_unbounded_positions_skip_only_the_range_check():
    "With `max_len=None` any integer positions and any length pass; every other check still refuses, with its message."
    layer = _Identity(8, 2, max_len=None)
    assert layer.max_len is None
    x, long = torch.randn(2, 5, 8), torch.randn(2, 1000, 8)
    _eq(layer.check_inputs(x, long, long), (2, 5, 1000))
    _eq(layer.check_inputs(x, x, x, q_positions=torch.tensor([-9, -3, 0, 10**9, 7]), k_positions=torch.tensor([[-1] * 5, [2**40] * 5])), (2, 5, 5))
    cases = [(TypeError, r"q_positions must be an integer Tensor \(int64, int32, int16, int8 or uint8\), got dtype torch.float32",
              dict(q_positions=torch.zeros(5))),
             (ValueError, r"k_positions must have shape \(5,\) or \(2, 5\), got \(4,\)", dict(k_positions=torch.zeros(4, dtype=torch.long))),
             (ValueError, r"q_position_mask must have the shape of its positions \(5,\), got \(2, 5\)",
              dict(q_positions=torch.zeros(5, dtype=torch.long), q_position_mask=torch.ones(2, 5, dtype=torch.bool))),
             (TypeError, r"k_position_mask must be a bool Tensor, got dtype torch.int64", dict(k_position_mask=torch.ones(5, dtype=torch.long)))]
    for error, message, kw in cases:
        with pytest.raises(error, match=message): layer.check_inputs(x, x, x, **kw)
    with pytest.raises(ValueError, match=r"q_positions must be on the input's device meta, got cpu"):
        layer.check_inputs(*[torch.empty(2, 5, 8, device='meta')] * 3, q_positions=torch.zeros(5, dtype=torch.long))
