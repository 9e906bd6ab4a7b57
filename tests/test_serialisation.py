"""Serialisation and movement: `state_dict`, `torch.save`/`torch.load` of the whole module, `copy.deepcopy`,
`.to(dtype)`, `.to(device)` and `torch.autocast` all give results consistent with the original layer; loading a
table of another `max_len` fails with a message that gives both sizes."""
import copy
import io
import re

import pytest
import torch

from additive_pos_attn.additive import AdditivePosMultiheadAttention, additive_reference
from additive_pos_attn.testing import example_call, random_layer

KEYS = ['pos_emb', 'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias']


def run(layer, x, memory, kw, **extra):
    "The example call (`kw` asks for the weights): `(output, weights)`."
    return layer(x, memory, memory, **kw, **extra)


def assert_same_outputs(a, b, **tol):
    for t, u in zip(a, b): torch.testing.assert_close(t, u, **(tol or dict(rtol=0, atol=0)))


def test_state_dict_into_a_fresh_layer(device):
    layer = random_layer(max_len=23, device=device)
    x, memory, kw = example_call(device)
    assert list(layer.state_dict()) == KEYS
    fresh = AdditivePosMultiheadAttention(16, 4, max_len=23, dtype=torch.float64, device=device)
    fresh.load_state_dict(layer.state_dict())
    assert_same_outputs(run(fresh, x, memory, kw), run(layer, x, memory, kw))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.reset_parameters()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # a plain state_dict loads with the safe loader
    assert_same_outputs(run(fresh, x, memory, kw), run(layer, x, memory, kw))


def test_save_and_load_the_whole_module(device):
    layer = random_layer(max_len=23, device=device)
    x, memory, kw = example_call(device)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module is a pickle: only for files you trust
    assert type(loaded) is AdditivePosMultiheadAttention and loaded.max_len == 23 and loaded.pos_emb.device == layer.pos_emb.device
    assert_same_outputs(run(loaded, x, memory, kw), run(layer, x, memory, kw))
    buffer.seek(0)
    on_cpu = torch.load(buffer, weights_only=False, map_location='cpu')
    assert_same_outputs(run(on_cpu, *example_call('cpu')), [t.cpu() for t in run(layer, x, memory, kw)], rtol=1e-12, atol=1e-12)


def test_deepcopy_is_equal_and_separate(device):
    layer = random_layer(max_len=23, device=device)
    x, memory, kw = example_call(device)
    clone = copy.deepcopy(layer)
    assert_same_outputs(run(clone, x, memory, kw), run(layer, x, memory, kw))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), layer.parameters()))
    before = layer.pos_emb.detach().clone()
    run(clone, x, memory, kw)[0].sum().backward()
    with torch.no_grad(): clone.pos_emb.sub_(clone.pos_emb.grad)
    assert torch.equal(layer.pos_emb, before) and layer.pos_emb.grad is None


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_to_dtype(device, dtype, tol):
    layer = random_layer(max_len=23, device=device)
    x, memory, kw = example_call(device)
    reference = run(layer, x, memory, kw)
    low = copy.deepcopy(layer).to(dtype)
    assert all(p.dtype == dtype for p in low.parameters())
    out = run(low, x.to(dtype), memory.to(dtype), kw)
    assert [t.dtype for t in out] == [dtype, dtype]
    assert_same_outputs([t.double() for t in out], reference, rtol=tol, atol=tol)
    # the output to `tol` of its largest entry, the weights (in [0, 1]) to `tol`
    torch.testing.assert_close(out[0].double(), reference[0], rtol=0, atol=tol * reference[0].abs().max().item())
    torch.testing.assert_close(out[1].double(), reference[1], rtol=0, atol=tol)
    back = low.to(torch.float64)  # and back: exactly the rounded parameters
    assert torch.equal(back.pos_emb, layer.pos_emb.to(dtype).double())


@pytest.mark.cuda
def test_to_device_and_back():
    layer = random_layer(max_len=23)
    x, memory, kw = example_call('cpu')
    reference = run(layer, x, memory, kw)
    moved = copy.deepcopy(layer).to('cuda')
    assert all(p.is_cuda for p in moved.parameters())
    out = run(moved, *example_call('cuda'))
    assert_same_outputs([t.cpu() for t in out], reference, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"q_positions must be on the input's device"):
        moved(x.cuda(), memory.cuda(), memory.cuda(), q_positions=kw['q_positions'])  # positions left on the CPU
    back = moved.to('cpu')
    assert_same_outputs(run(back, x, memory, kw), reference)


def test_autocast_bfloat16(device):
    "Under autocast a float32 layer runs its matrix products in bfloat16, with float32 or bfloat16 inputs."
    layer = random_layer(max_len=23, device=device, dtype=torch.float32)
    x, memory, kw = example_call(device, dtype=torch.float32)
    reference = run(layer, x, memory, kw)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = run(layer, x, memory, kw)
        out_bf16_inputs = run(layer, x.bfloat16(), memory.bfloat16(), kw)
        causal = layer(x, x, x, is_causal=True)[0]
    assert out[0].dtype == torch.bfloat16 and out_bf16_inputs[0].dtype == torch.bfloat16 and causal.dtype == torch.bfloat16
    assert_same_outputs([t.float() for t in out], reference, rtol=5e-2, atol=5e-2)
    assert_same_outputs([t.float() for t in out_bf16_inputs], reference, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out_bf16_inputs[0].float(), reference[0], rtol=0, atol=5e-2)
    torch.testing.assert_close(causal.float(), layer(x, x, x, is_causal=True)[0], rtol=5e-2, atol=5e-2)
    out[0].float().square().sum().backward()
    grad = layer.pos_emb.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0  # the table's gradient stays in its own precision
    layer.pos_emb.grad = None
    run(layer, x, memory, kw)[0].square().sum().backward()
    torch.testing.assert_close(grad, layer.pos_emb.grad, rtol=0.1, atol=0.1 * layer.pos_emb.grad.abs().max().item())


def test_autocast_matches_the_definition(device):
    "The oracle under the same autocast gives the same bfloat16 result: positions are added before the casts."
    layer = random_layer(max_len=23, device=device, dtype=torch.float32)
    x, memory, kw = example_call(device, dtype=torch.float32)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = run(layer, x, memory, kw)
        fused = layer(x, memory, memory, **dict(kw, need_weights=False))[0]  # the layer's own path, not the wrapped module
        ref = additive_reference(layer, x, memory, memory, **kw)
        ref_fused = additive_reference(layer, x, memory, memory, **dict(kw, need_weights=False))[0]
    assert_same_outputs(out, ref, rtol=1e-2, atol=1e-2)
    # bfloat16 keeps 8 bits: the two routes round differently (torch's own need_weights=True/False differ as much),
    # by up to about 1% of the output's largest entry
    torch.testing.assert_close(fused, ref_fused, rtol=1e-2, atol=1e-2 * ref_fused.abs().max().item())


def test_state_dict_of_another_max_len_is_refused():
    "A table of another length does not load; the message gives both sizes (resample the table first)."
    saved = random_layer(max_len=37).state_dict()
    layer = AdditivePosMultiheadAttention(16, 4, max_len=23, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError)) as error:
        layer.load_state_dict(saved)
    message = str(error.value)
    assert 'pos_emb' in message and re.search(r'\b37\b', message) and re.search(r'\b23\b', message), message
