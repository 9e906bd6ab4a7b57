"""`torch.compile`, for every positional layer: the layer compiles into one graph (`fullgraph=True`) on the
default-position path and with explicit positions, position masks, attention and padding masks, in training and
evaluation mode, and gives the eager output; a second sequence length recompiles once; bad positions are refused
inside the graph (the additive layer's range check, which reads the positions' values in eager mode, is an assertion
in the graph while compiling); a compiled layer copies and saves as itself; compiled decoding does not recompile
every step."""
import copy, io
from typing import Callable, NamedTuple

import pytest
import torch
import torch._dynamo
from torch import Tensor

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.additive import AdditivePosMultiheadAttention, additive_reference
from additive_pos_attn.alibi import ALiBiMultiheadAttention, alibi_reference
from additive_pos_attn.attention import choose_path
from additive_pos_attn.positions import causal_mask
from additive_pos_attn.relative import relative_reference
from additive_pos_attn.rotary import RoPEMultiheadAttention, rope_reference
from cases import randomise


class Kind(NamedTuple):
    make: Callable          # device -> a float64 layer, embed_dim 16 and 4 heads
    reference: Callable     # the oracle
    bad_positions: Tensor   # k_positions the layer refuses for the 11 keys of `case`...
    message: str            # ...with this message
    error: type             # ...and this error, compiled


# A shape is known while tracing, so a wrong one is refused then: `fullgraph=True` reports the ValueError raised while
# tracing as Dynamo's own error, quoting its message.
_WRONG_LENGTH = (torch.arange(10), r"k_positions must have shape \(11,\) or \(2, 11\), got \(", Exception)
KINDS = [pytest.param(Kind(lambda device: AdditivePosMultiheadAttention(16, 4, max_len=32, dtype=torch.float64, device=device),
                           additive_reference, torch.arange(22, 33), r"k_positions must lie in \[0, max_len=32\)",
                           RuntimeError), id='additive'),
         pytest.param(Kind(lambda device: AdditiveRelMultiheadAttention(16, 4, max_distance=16, dtype=torch.float64, device=device),
                           relative_reference, *_WRONG_LENGTH), id='relative'),
         pytest.param(Kind(lambda device: RoPEMultiheadAttention(16, 4, dtype=torch.float64, device=device),
                           rope_reference, *_WRONG_LENGTH), id='rotary'),
         pytest.param(Kind(lambda device: ALiBiMultiheadAttention(16, 4, dtype=torch.float64, device=device),
                           alibi_reference, *_WRONG_LENGTH), id='alibi')]


@pytest.fixture(params=KINDS)
def case(device, request):
    "The kind, its layer with the table drawn from N(0, 1) and every other parameter moved by 0.3·N(0, 1); inputs."
    kind = request.param
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = randomise(kind.make(device))
    x = torch.randn(2, 8, 16, dtype=torch.float64, device=device)
    memory = torch.randn(2, 11, 16, dtype=torch.float64, device=device)
    yield kind, layer, x, memory
    torch._dynamo.reset()


def _grads(layer, out):
    return torch.autograd.grad(out.square().sum(), list(layer.parameters()))


@pytest.mark.slow
def test_default_positions_compile_to_one_graph(case):
    """Self-attention with gradients compiles to one graph without breaks, on the fused path, and gives the eager
    output and gradients."""
    kind, layer, x, _ = case
    assert choose_path(layer.attn, need_weights=False).name == 'fused'
    explanation = torch._dynamo.explain(layer)(x, x, x, is_causal=True)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True)
    out, eager = compiled(x, x, x, is_causal=True)[0], layer(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, kind.reference(layer, x, x, x, attn_mask=causal_mask(8, 8, x.device))[0], rtol=1e-10, atol=1e-12)
    for grad, eager_grad in zip(_grads(layer, out), _grads(layer, eager)):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_explicit_positions_and_masks_compile_to_one_graph(case, training):
    """Explicit positions, a position mask, an attention mask and a padding mask compile with `fullgraph=True`, in
    training and evaluation mode, and give the eager output and gradients; a bad position is refused by the graph."""
    kind, layer, x, memory = case
    layer.train(training)
    positions = dict(q_positions=torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [0, 1, 2, 3, 4, 5, 6, 7]], device=x.device),
                     k_positions=torch.arange(20, 31, device=x.device), k_position_mask=torch.arange(11, device=x.device) % 3 > 0,
                     attn_mask=torch.rand(8, 11, device=x.device) < 0.2,
                     key_padding_mask=torch.tensor([[False] * 11, [False] * 8 + [True] * 3], device=x.device))
    compiled = torch.compile(layer, fullgraph=True)
    out, eager = compiled(x, memory, memory, **positions)[0], layer(x, memory, memory, **positions)[0]
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, kind.reference(layer, x, memory, memory, **positions)[0], rtol=1e-10, atol=1e-12)
    for grad, eager_grad in zip(_grads(layer, out), _grads(layer, eager)):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-12)
    # The checks run in the compiled graph: a bad position is refused, loudly and by name, not gathered out of bounds.
    # (On CUDA the graph's assertion is a device-side assert, which would end the process's CUDA context: CPU only.)
    if kind.error is RuntimeError and x.device.type == 'cuda': return
    with pytest.raises(kind.error, match=kind.message):
        compiled(x, memory, memory, q_positions=positions['q_positions'], k_positions=kind.bad_positions.to(x.device))


@pytest.mark.slow
def test_a_second_length_recompiles_once(case):
    "Explicit positions at four sequence lengths compile twice: the second length makes the length dynamic."
    from torch._dynamo.testing import CompileCounter
    kind, layer, _, _ = case
    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for length in (8, 12, 16, 20):
        x = torch.randn(2, length, 16, dtype=torch.float64, device=layer.attn.in_proj_weight.device)
        p = torch.arange(length, device=x.device) + 3
        torch.testing.assert_close(compiled(x, x, x, q_positions=p, k_positions=p, is_causal=True)[0],
                                   layer(x, x, x, q_positions=p, k_positions=p, is_causal=True)[0], rtol=1e-10, atol=1e-12)
    print(f'{type(layer).__name__}: {counter.frame_count} compilations for 4 lengths')
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.slow
def test_compiled_layer_copies_and_saves_as_itself(case):
    """`layer.compile()` keeps a compiled forward bound to the layer; a deep copy or a saved layer must not carry it
    (`nn.Module.__getstate__` drops it), or a copy would run the original's weights."""
    kind, layer, x, _ = case
    layer.eval().compile(backend='eager')
    with torch.no_grad(): layer(x, x, x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        for p in clone.parameters(): p.mul_(-2)  # the table (if any) and every projection
        torch.testing.assert_close(clone(x, x, x)[0], kind.reference(clone, x, x, x)[0], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(clone(x, x, x)[0], layer(x, x, x)[0])
    buffer = io.BytesIO(); torch.save(layer, buffer); buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x, x)[0], kind.reference(layer, x, x, x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_decoding_does_not_recompile_every_step(case):
    """A decoding step compiles to one graph (`fullgraph=True`) and, the cache's buffers being preallocated, does not
    recompile every step: a prompt and 10 tokens compile at most 3 times (the prompt, the first token, then once more
    with the filled length dynamic), giving the eager outputs."""
    from torch._dynamo.testing import CompileCounter
    _, layer, x, _ = case
    layer.eval()
    counter = CompileCounter()
    step = torch.compile(lambda t, cache: layer(t, t, t, cache=cache, is_causal=True)[0], backend=counter, fullgraph=True)
    compiled_cache, eager_cache = layer.init_cache(2, 12), layer.init_cache(2, 12)
    with torch.no_grad():
        for tokens in [x[:, :2], *torch.randn(2, 10, 16, dtype=torch.float64, device=x.device).split(1, dim=1)]:
            torch.testing.assert_close(step(tokens, compiled_cache), layer(tokens, tokens, tokens, cache=eager_cache, is_causal=True)[0],
                                       rtol=1e-10, atol=1e-12)
    print(f'compiled decoding of a prompt and 10 tokens: {counter.frame_count} compilations')
    assert counter.frame_count <= 3, counter.frame_count
    assert compiled_cache.length == eager_cache.length == 12


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['additive', 'relative', 'rotary', 'alibi'])
def test_compiled_stack_decodes_a_prompt_and_100_tokens_in_two_compilations(device, kind):
    """A decoder-only stack's step (two `PosTransformerEncoderLayer` blocks, a `KVCache` each), compiled with inductor
    and `fullgraph=True`, compiles twice for a prompt and 100 new tokens, up to a full cache: the prompt, then one
    graph for every token (the filled length dynamic from the first token on); a second, fresh set of caches
    compiles nothing more. Every step gives the eager output."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from additive_pos_attn.blocks import positional_attention
    from additive_pos_attn.encoder import PosTransformerEncoderLayer
    torch._dynamo.reset()
    prompt_len, new, B = 5, 100, 2
    stack = []
    for seed in range(2):
        torch.manual_seed(seed)
        attention = positional_attention(kind, 16, 4, max_len=prompt_len + new, dtype=torch.float64, device=device)
        stack.append(randomise(PosTransformerEncoderLayer(attention, dim_feedforward=32, dropout=0.0, dtype=torch.float64,
                                                          device=device)).eval())

    def step(x, caches):
        for block, cache in zip(stack, caches): x = block(x, is_causal=True, cache=cache)
        return x

    counter = CompileCounterWithBackend('inductor')
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = torch.randn(B, prompt_len + new, 16, dtype=torch.float64, device=device)
    with torch.no_grad():
        for run in range(2):
            caches = [block.init_cache(B, prompt_len + new) for block in stack]
            eager_caches = [block.init_cache(B, prompt_len + new) for block in stack]
            for tokens in [x[:, :prompt_len], *x[:, prompt_len:].split(1, dim=1)]:
                torch.testing.assert_close(compiled(tokens, caches), step(tokens, eager_caches), rtol=1e-10, atol=1e-12)
            assert caches[0].length == eager_caches[0].length == prompt_len + new
    print(f'{kind}: {counter.frame_count} compilations for a prompt and {new} tokens, twice')
    assert counter.frame_count <= 2, counter.frame_count
    torch._dynamo.reset()
