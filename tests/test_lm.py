"""`PosTransformerLM` exhaustively, for every scheme: its sizes and parts, the tied read-out, `reset_parameters`, the
state dict round trip, the factory options (float64, the meta device), causality, left padding at the positions
`padded_positions` gives (no NaN reaching a real token), explicit positions, decoding with its `LMCache` as it
recomputes (an error leaves every block's cache as it was), and every refusal with its message."""
import io

import pytest
import torch
from torch import nn

from additive_pos_attn import PosTransformerLM
from additive_pos_attn.blocks import ATTENTION_KINDS
from additive_pos_attn.lm import LMCache
from additive_pos_attn.positions import padded_positions
from cases import LM_SIZES, close, left_padded, lm, randomise
from strategies import DTYPE

V, D, H, MAX_LEN = LM_SIZES

KINDS = pytest.mark.parametrize('kind', ATTENTION_KINDS)


pytestmark = pytest.mark.usefixtures('one_thread')


@KINDS
def test_sizes_and_parts(kind):
    model = PosTransformerLM(V, D, H, 3, attention=kind, max_len=MAX_LEN, dim_feedforward=40, dropout=0.1)
    assert (model.vocab_size, model.d_model, len(model.blocks)) == (V, D, 3)
    assert model.max_len == (MAX_LEN if kind == 'additive' else None)
    assert model.attention == kind
    for block in model.blocks:
        assert block.linear1.weight.shape == (40, D) and block.dropout.p == 0.1 and block.self_attn.attn.dropout == 0.1
    assert model.head.bias is None and model.norm.normalized_shape == (D,)
    assert PosTransformerLM(V, D, H, 1, attention=kind, max_len=MAX_LEN).blocks[0].linear1.out_features == 4 * D
    if kind == 'relative': assert model.blocks[0].self_attn.max_distance == MAX_LEN - 1


def test_rotary_needs_no_max_len_and_attention_kwargs_reach_the_layers():
    model = PosTransformerLM(V, D, H, 2, rope_base=500.0, bias=False)
    assert model.max_len is None and all(b.self_attn.rope_base == 500.0 for b in model.blocks)
    assert model.blocks[0].self_attn.attn.in_proj_bias is None
    additive = PosTransformerLM(V, D, H, 1, attention='additive', max_len=8, init='sinusoidal')
    assert additive.blocks[0].self_attn.pos_emb.abs().sum() > 0
    assert PosTransformerLM(V, D, H, 1).blocks[0].self_attn.batch_first


@KINDS
def test_tied_and_untied_read_out(kind):
    tied = PosTransformerLM(V, D, H, 1, attention=kind, max_len=MAX_LEN)
    assert tied.head.weight is tied.embed.weight
    untied = PosTransformerLM(V, D, H, 1, attention=kind, max_len=MAX_LEN, tie_weights=False)
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == V * D
    tied(torch.randint(0, V, (2, 5))).sum().backward()  # one parameter, gradients from both uses
    assert tied.embed.weight.grad is not None and tied.head.weight.grad is tied.embed.weight.grad


@KINDS
def test_reset_parameters_draws_every_parameter_again(kind):
    model = lm(kind)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith(('pos_emb', 'rel_bias')): assert (p == 0).all(), name  # the schemes' default: zero
        elif name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight')): assert (p == 1).all(), name
        elif name.endswith(('norm1.bias', 'norm2.bias', 'norm.bias', 'in_proj_bias', 'out_proj.bias')):
            assert (p == 0).all(), name
        else: assert not torch.equal(p, before[name]), name
    assert model.head.weight is model.embed.weight
    torch.manual_seed(0)
    fresh = PosTransformerLM(V, D, H, 2, attention=kind, max_len=MAX_LEN, dtype=DTYPE)
    assert abs(fresh.embed.weight.std().item() - D ** -0.5) < 0.05  # N(0, 1/D): tied logits of unit scale


@KINDS
@pytest.mark.parametrize('tie_weights', [True, False])
def test_state_dict_round_trip(kind, tie_weights):
    model = lm(kind, tie_weights=tie_weights)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = PosTransformerLM(V, D, H, 2, attention=kind, max_len=MAX_LEN, dtype=DTYPE, tie_weights=tie_weights).eval()
    other.load_state_dict(torch.load(buffer))
    tokens = torch.randint(0, V, (2, 7))
    assert torch.equal(other(tokens), model(tokens))
    assert (other.head.weight is other.embed.weight) == tie_weights
    keys = list(model.state_dict())
    assert keys[0] == 'embed.weight' and keys[-1] == 'head.weight' and keys == list(other.state_dict())


@KINDS
def test_factory_kwargs(kind):
    double = PosTransformerLM(V, D, H, 2, attention=kind, max_len=MAX_LEN, dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    assert double(torch.randint(0, V, (2, 4))).dtype == torch.float64
    meta = PosTransformerLM(V, D, H, 2, attention=kind, max_len=MAX_LEN, device='meta')
    assert all(p.is_meta for p in meta.parameters())
    cache = double.init_cache(2, 6)
    assert isinstance(cache, LMCache) and len(cache) == 2 and cache[0].keys.dtype == torch.float64


@KINDS
def test_causal(kind):
    "Changing token t changes no logit before t, and changes the logits at t."
    model = lm(kind)
    tokens = torch.randint(0, V, (3, 9))
    for t in (0, 4, 8):
        changed = tokens.clone(); changed[:, t] = (tokens[:, t] + 1) % V
        before, after = model(tokens), model(changed)
        close(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t], after[:, t])


@KINDS
def test_positions_matter_and_default_to_arange(kind):
    model = lm(kind)
    tokens = torch.randint(0, V, (2, 6))
    close(model(tokens), model(tokens, positions=torch.arange(6)))  # a path of its own for the default positions
    shifted = model(tokens, positions=torch.arange(6) + 3)
    if kind == 'additive': assert not torch.allclose(shifted, model(tokens))
    else: close(shifted, model(tokens))  # offsets alone: a shift changes nothing


@KINDS
def test_left_padding_is_each_prompt_alone(kind, device):
    model = lm(kind, device=device)
    tokens, padding = left_padded([7, 3, 1, 5], 7, device)
    logits = model(tokens, padding_mask=padding)
    assert not logits.isnan().any()
    for row, n in enumerate([7, 3, 1, 5]): close(logits[row, 7 - n:], model(tokens[row:row + 1, 7 - n:])[0])
    positions, _ = padded_positions(padding)
    close(model(tokens, padding_mask=padding, positions=positions)[~padding], logits[~padding])


@KINDS
def test_padding_never_reaches_real_tokens(kind):
    "Whatever the padding tokens are, the real tokens' logits are the same: padding rows reach no real token."
    model = lm(kind)
    tokens, padding = left_padded([6, 2], 6)
    other = tokens.masked_fill(padding, V - 1)
    close(model(tokens, padding_mask=padding)[~padding], model(other, padding_mask=padding)[~padding])


@KINDS
@pytest.mark.parametrize('chunks', [(4, 1, 1, 1), (4, 3), (1, 1, 1, 1, 1, 1, 1)], ids=['token by token', 'in chunks', 'from one token'])
def test_decoding_with_the_cache_is_recomputing(kind, chunks, device):
    model = lm(kind, device=device)
    lengths = [4, 2, 1] if chunks[0] == 4 else [1, 1, 1]
    prompt, padding = left_padded(lengths, chunks[0], device)
    more = torch.randint(0, V, (3, sum(chunks) - chunks[0]), device=device)
    cache = model.init_cache(3, sum(chunks))
    out, start = [model(prompt, padding_mask=padding, cache=cache)], 0
    for n in chunks[1:]:
        out.append(model(more[:, start:start + n], cache=cache)); start += n
    whole_padding = torch.cat([padding, torch.zeros_like(more, dtype=torch.bool)], dim=1)
    whole = model(torch.cat([prompt, more], dim=1), padding_mask=whole_padding)
    close(torch.cat(out, dim=1)[~whole_padding], whole[~whole_padding])
    assert cache.length == sum(chunks) and cache.max_length == sum(chunks) and cache.batch_size == 3
    assert cache.next_position.tolist() == [n + sum(chunks) - chunks[0] for n in lengths]


def test_a_failed_call_leaves_every_cache_as_it_was():
    model = lm('additive')
    cache = model.init_cache(2, 5)
    model(torch.randint(0, V, (2, 3)), cache=cache, padding_mask=torch.tensor([[True, False, False], [False] * 3]))
    states = [(c.length, c.steps, c.next_position.tolist()) for c in cache]
    with pytest.raises(ValueError, match=r"the cache is full: it holds max_length=5 tokens, 3 are written, and step 1 writes 3 more"):
        model(torch.randint(0, V, (2, 3)), cache=cache)
    # a refusal in the second block only: its cache is another model's
    other = lm('additive').init_cache(2, 5)
    mixed = LMCache([cache[0], other[1]])
    with pytest.raises(ValueError, match=r"cache was made by another layer"): model(torch.randint(0, V, (2, 1)), cache=mixed)
    assert [(c.length, c.steps, c.next_position.tolist()) for c in cache] == states


def test_refusals():
    model = PosTransformerLM(V, D, H, 1)
    tokens = torch.randint(0, V, (2, 4))
    cases = [
        (TypeError, r"tokens must be a Tensor of token ids, got list", lambda: model([[1, 2]])),
        (TypeError, r"tokens must be an integer Tensor of token ids, got torch.float64", lambda: model(tokens.double())),
        (TypeError, r"tokens must be an integer Tensor of token ids, got torch.bool", lambda: model(tokens > 3)),
        (ValueError, r"tokens must be \(B, T\) with T >= 1, got shape \(2, 0\)", lambda: model(tokens[:, :0])),
        (ValueError, r"tokens must be \(B, T\) with T >= 1, got shape \(2, 4, 1\)", lambda: model(tokens[..., None])),
        (TypeError, r"padding_mask must be a bool Tensor \(True at padding\), got torch.float32",
         lambda: model(tokens, padding_mask=torch.zeros(2, 4))),
        (TypeError, r"padding_mask must be a bool Tensor \(True at padding\), got list", lambda: model(tokens, padding_mask=[])),
        (ValueError, r"padding_mask must have the shape of tokens, \(2, 4\), got \(4,\)",
         lambda: model(tokens, padding_mask=torch.zeros(4, dtype=torch.bool))),
        (TypeError, r"cache must be an LMCache made by the model's init_cache, got KVCache",
         lambda: model(tokens, cache=model.blocks[0].init_cache(2, 4))),
        (ValueError, r"max_len is required for 'additive' attention \(a row for each position\), got None",
         lambda: PosTransformerLM(V, D, H, 1, attention='additive')),
        (ValueError, r"max_len is required for 'relative' attention \(a row for each offset, max_len - 1 of them, unless "
                     r"max_distance is given\), got None",
         lambda: PosTransformerLM(V, D, H, 1, attention='relative')),
        (ValueError, r"max_len must be a positive int, got 0", lambda: PosTransformerLM(V, D, H, 1, attention='additive', max_len=0)),
        (ValueError, r"kind must be one of 'additive', 'relative', 'rotary', 'alibi', got 'none'", lambda: PosTransformerLM(V, D, H, 1, attention='none')),
        (ValueError, r"vocab_size must be a positive int, got 0", lambda: PosTransformerLM(0, D, H, 1)),
        (TypeError, r"d_model must be an int, got float 16.0", lambda: PosTransformerLM(V, 16.0, H, 1)),
        (TypeError, r"num_layers must be an int, got str '2'", lambda: PosTransformerLM(V, D, H, '2')),
        (TypeError, r"tie_weights must be a bool, got int 1", lambda: PosTransformerLM(V, D, H, 1, tie_weights=1)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message): call()
    with pytest.raises(ValueError, match=r"sequence length for q_positions is 5, which exceeds max_len=4"):
        PosTransformerLM(V, D, H, 1, attention='additive', max_len=4)(torch.randint(0, V, (1, 5)))


def test_training_reaches_every_parameter():
    model = PosTransformerLM(V, D, H, 2, attention='additive', max_len=MAX_LEN, dropout=0.1)
    randomise(model).train()
    tokens = torch.randint(0, V, (4, 8))
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters(): assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_importing_the_package_never_imports_the_corpus_and_training():
    import subprocess, sys
    code = "import sys, additive_pos_attn.lm, additive_pos_attn; assert 'additive_pos_attn.text' not in sys.modules"
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0
