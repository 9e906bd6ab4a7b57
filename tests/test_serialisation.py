"""Serialisation and movement, for every positional layer: `state_dict`, `torch.save`/`torch.load` of the whole
module, `copy.deepcopy`, `.to(dtype)`, `.to(device)` and `torch.autocast` all give results consistent with the
original layer; loading a table of another size fails with a message that gives both sizes. ALiBi's slopes, a buffer,
travel in the state_dict and move and cast with the module."""
import copy
import io
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.additive import AdditivePosMultiheadAttention, additive_reference
from additive_pos_attn.alibi import ALiBiMultiheadAttention, alibi_reference
from additive_pos_attn.relative import relative_reference
from additive_pos_attn.rotary import RoPEMultiheadAttention, rope_reference
from additive_pos_attn.testing import example_call, random_layer
from cases import randomise

ATTN_KEYS = ['attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias']


@dataclass(frozen=True)
class Kind:
    "A positional layer for `example_call` (`embed_dim=16`, 4 heads), built with `config` besides its dtype and device."
    cls: type
    config: dict
    table: Optional[str]          # the positional parameter, if the layer has one
    reference: Callable           # the oracle
    oracle_autocasts: bool = True  # whether the oracle runs its products under autocast (rotary's is float64 throughout)
    buffers: tuple = ()            # the layer's own state_dict entries beside its parameters (ALiBi's slopes)

    def fresh(self, device=None, dtype=torch.float64):
        return self.cls(16, 4, **self.config, device=device, dtype=dtype)

    def random(self, device=None, dtype=torch.float64):
        "Seeded, every parameter moved off its initial value as `random_layer` does (it is `random_layer` for the additive layer)."
        torch.manual_seed(0)
        return randomise(self.fresh(device, dtype))

    @property
    def tracked(self) -> str:
        "The parameter whose gradient the tests follow: the table, or the input projection of a layer without one."
        return self.table or 'attn.in_proj_weight'


ADDITIVE = Kind(AdditivePosMultiheadAttention, dict(max_len=23), 'pos_emb', additive_reference)
KINDS = [pytest.param(ADDITIVE, id='additive'),
         pytest.param(Kind(AdditiveRelMultiheadAttention, dict(max_distance=5), 'rel_bias', relative_reference), id='relative'),
         pytest.param(Kind(AdditiveRelMultiheadAttention, dict(max_distance=5, per_head=False), 'rel_bias', relative_reference),
                      id='relative-shared'),
         pytest.param(Kind(RoPEMultiheadAttention, dict(rope_base=500.0, interleaved=False), None, rope_reference, oracle_autocasts=False),
                      id='rotary'),
         pytest.param(Kind(AdditiveRelMultiheadAttention, dict(max_distance=6, num_buckets=8), 'rel_bias', relative_reference),
                      id='relative-t5'),
         pytest.param(Kind(ALiBiMultiheadAttention, {}, None, alibi_reference, buffers=('slopes',)), id='alibi')]


def run(layer, x, memory, kw, **extra):
    "The example call (`kw` asks for the weights): `(output, weights)`."
    return layer(x, memory, memory, **kw, **extra)


def assert_same_outputs(a, b, **tol):
    for t, u in zip(a, b): torch.testing.assert_close(t, u, **(tol or dict(rtol=0, atol=0)))


def param(layer, name): return layer.get_parameter(name)


def test_the_additive_kind_is_random_layer():
    assert all(torch.equal(a, b) for a, b in zip(ADDITIVE.random().parameters(), random_layer(max_len=23).parameters()))


@pytest.mark.parametrize('kind', KINDS)
def test_state_dict_into_a_fresh_layer(device, kind):
    layer = kind.random(device)
    x, memory, kw = example_call(device)
    assert list(layer.state_dict()) == [kind.table] * bool(kind.table) + list(kind.buffers) + ATTN_KEYS
    fresh = kind.fresh(device)
    fresh.load_state_dict(layer.state_dict())
    assert_same_outputs(run(fresh, x, memory, kw), run(layer, x, memory, kw))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.reset_parameters()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # a plain state_dict loads with the safe loader
    assert_same_outputs(run(fresh, x, memory, kw), run(layer, x, memory, kw))


@pytest.mark.parametrize('kind', KINDS)
def test_save_and_load_the_whole_module(device, kind):
    layer = kind.random(device)
    x, memory, kw = example_call(device)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module is a pickle: only for files you trust
    assert type(loaded) is kind.cls and {k: getattr(loaded, k) for k in kind.config} == kind.config  # rope_base, interleaved too
    assert param(loaded, kind.tracked).device == param(layer, kind.tracked).device
    assert_same_outputs(run(loaded, x, memory, kw), run(layer, x, memory, kw))
    buffer.seek(0)
    on_cpu = torch.load(buffer, weights_only=False, map_location='cpu')
    assert_same_outputs(run(on_cpu, *example_call('cpu')), [t.cpu() for t in run(layer, x, memory, kw)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kind', KINDS)
def test_deepcopy_is_equal_and_separate(device, kind):
    layer = kind.random(device)
    x, memory, kw = example_call(device)
    clone = copy.deepcopy(layer)
    assert_same_outputs(run(clone, x, memory, kw), run(layer, x, memory, kw))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), layer.parameters()))
    before = [p.detach().clone() for p in layer.parameters()]
    run(clone, x, memory, kw)[0].sum().backward()
    assert param(clone, kind.tracked).grad.abs().sum() > 0
    with torch.no_grad():
        for p in clone.parameters(): p.sub_(p.grad)
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(layer.parameters(), before))


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_to_dtype(device, kind, dtype, tol):
    layer = kind.random(device)
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
    back = low.to(torch.float64)  # and back: exactly the rounded parameters, the table among them
    assert all(torch.equal(b, p.to(dtype).double()) for b, p in zip(back.parameters(), layer.parameters()))


@pytest.mark.cuda
@pytest.mark.parametrize('kind', KINDS)
def test_to_device_and_back(kind):
    layer = kind.random()
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


@pytest.mark.parametrize('kind', KINDS)
def test_autocast_bfloat16(device, kind):
    "Under autocast a float32 layer runs its matrix products in bfloat16, with float32 or bfloat16 inputs."
    layer = kind.random(device, dtype=torch.float32)
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
    tracked = param(layer, kind.tracked)
    grad = tracked.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0  # the table's gradient stays in its own precision
    tracked.grad = None
    run(layer, x, memory, kw)[0].square().sum().backward()
    torch.testing.assert_close(grad, tracked.grad, rtol=0.1, atol=0.1 * tracked.grad.abs().max().item())


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.filterwarnings('ignore:Support for mismatched key_padding_mask:UserWarning')  # torch's note on relative_reference's masks
def test_autocast_matches_the_definition(device, kind):
    """The oracle under the same autocast gives the same bfloat16 result: positions (or the bias) come before
    the casts. Rotary's oracle computes in float64 whatever autocast says: the layer follows it to bfloat16's
    rounding, relative to the output's largest entry."""
    layer = kind.random(device, dtype=torch.float32)
    x, memory, kw = example_call(device, dtype=torch.float32)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = run(layer, x, memory, kw)
        fused = layer(x, memory, memory, **dict(kw, need_weights=False))[0]  # the layer's own path, not the wrapped module
        ref = kind.reference(layer, x, memory, memory, **kw)
        ref_fused = kind.reference(layer, x, memory, memory, **dict(kw, need_weights=False))[0]
    assert out[0].dtype == fused.dtype == torch.bfloat16
    assert ref[0].dtype == (torch.bfloat16 if kind.oracle_autocasts else torch.float64)
    if kind.oracle_autocasts: assert_same_outputs(out, ref, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(out[0].double(), ref[0], rtol=0, atol=1e-2 * ref[0].abs().max().item())
        torch.testing.assert_close(out[1].double(), ref[1], rtol=0, atol=1e-2)
    # bfloat16 keeps 8 bits: the two routes round differently (torch's own need_weights=True/False differ as much),
    # by up to about 1% of the output's largest entry
    torch.testing.assert_close(fused.double(), ref_fused.double(), rtol=1e-2, atol=1e-2 * ref_fused.abs().max().item())


def test_state_dict_of_another_max_len_is_refused():
    "A table of another length does not load; the message gives both sizes (resample the table first)."
    saved = random_layer(max_len=37).state_dict()
    layer = AdditivePosMultiheadAttention(16, 4, max_len=23, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError)) as error:
        layer.load_state_dict(saved)
    message = str(error.value)
    assert 'pos_emb' in message and re.search(r'\b37\b', message) and re.search(r'\b23\b', message), message


@pytest.mark.parametrize('config, shapes', [(dict(max_distance=37), ('75, 4', '47, 4')),
                                            (dict(max_distance=23, per_head=False), ('47', '47, 4'))])
def test_relative_table_of_another_shape_is_refused(config, shapes):
    "A relative table of another `max_distance`, or shared where the layer has one per head, does not load; the message gives both shapes."
    saved = AdditiveRelMultiheadAttention(16, 4, **config).state_dict()
    layer = AdditiveRelMultiheadAttention(16, 4, max_distance=23)
    with pytest.raises(RuntimeError) as error:
        layer.load_state_dict(saved)
    message = str(error.value)
    assert 'rel_bias' in message and all(f'torch.Size([{shape}])' in message for shape in shapes), message
