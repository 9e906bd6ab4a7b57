"""`torch.compile`: the layer compiles into one graph on the default-position path and gives the eager output;
with explicit positions it compiles (the range check reads the positions' extremes, a data-dependent value, so
Dynamo breaks the graph there) and still gives the eager output and refuses out-of-range positions; a compiled
layer copies and saves as itself."""
import copy, io

import pytest
import torch
import torch._dynamo

from additive_pos_attn.additive import AdditivePosMultiheadAttention, additive_reference
from additive_pos_attn.attention import choose_path
from additive_pos_attn.positions import causal_mask


@pytest.fixture
def case(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = AdditivePosMultiheadAttention(16, 4, max_len=32, dtype=torch.float64, device=device)
    with torch.no_grad(): layer.pos_emb.normal_()
    x = torch.randn(2, 8, 16, dtype=torch.float64, device=device)
    memory = torch.randn(2, 11, 16, dtype=torch.float64, device=device)
    yield layer, x, memory
    torch._dynamo.reset()


def _grads(layer, out):
    return torch.autograd.grad(out.square().sum(), [layer.pos_emb, layer.attn.in_proj_weight])


@pytest.mark.slow
def test_default_positions_compile_to_one_graph(case):
    """Self-attention with gradients compiles to one graph without breaks, on the fused path, and gives the eager
    output and gradients."""
    layer, x, _ = case
    assert choose_path(layer.attn, need_weights=False).name == 'fused'
    explanation = torch._dynamo.explain(layer)(x, x, x, is_causal=True)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True)
    out, eager = compiled(x, x, x, is_causal=True)[0], layer(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
    reference = additive_reference(layer, x, x, x, attn_mask=causal_mask(x.shape[1], x.shape[1], x.device))[0]
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    for grad, eager_grad in zip(_grads(layer, out), _grads(layer, eager)):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_explicit_positions_compile(case):
    layer, x, memory = case
    positions = dict(q_positions=torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [0, 1, 2, 3, 4, 5, 6, 7]], device=x.device),
                     k_positions=torch.arange(20, 31, device=x.device))
    compiled = torch.compile(layer)
    out, eager = compiled(x, memory, memory, **positions)[0], layer(x, memory, memory, **positions)[0]
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, additive_reference(layer, x, memory, memory, **positions)[0], rtol=1e-10, atol=1e-12)
    for grad, eager_grad in zip(_grads(layer, out), _grads(layer, eager)):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-12)
    # The check still runs between the compiled graphs: a bad position is refused, not gathered out of bounds.
    with pytest.raises(ValueError, match=r"k_positions must lie in \[0, max_len=32\), got values from 22 to 32"):
        compiled(x, memory, memory, q_positions=positions['q_positions'], k_positions=torch.arange(22, 33, device=x.device))


@pytest.mark.slow
def test_compiled_layer_copies_and_saves_as_itself(case):
    """`layer.compile()` keeps a compiled forward bound to the layer; a deep copy or a saved layer must not carry it
    (`nn.Module.__getstate__` drops it), or a copy would run the original's weights."""
    layer, x, _ = case
    layer.eval().compile(backend='eager')
    with torch.no_grad(): layer(x, x, x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.pos_emb.mul_(2); clone.attn.out_proj.weight.mul_(-1)
        torch.testing.assert_close(clone(x, x, x)[0], additive_reference(clone, x, x, x)[0], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(clone(x, x, x)[0], layer(x, x, x)[0])
    buffer = io.BytesIO(); torch.save(layer, buffer); buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x, x)[0], additive_reference(layer, x, x, x)[0], rtol=1e-10, atol=1e-12)
