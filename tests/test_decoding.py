"""Incremental decoding (`KVCache`, `cached_attention`, `DecoderCache`) exhaustively, on every device, in float64 to
1e-12: for each of the layers, decoding a sequence with a cache (the prompt in one call, then a token or a chunk
per call) gives what the layer gives on the whole sequence with the causal mask, at every step: positions counted by
the cache, with and without left padding (prompts of different lengths, positions as `padded_positions` gives them),
explicit positions shared or per sample (negative ones where the layer takes them), position masks, attention masks,
sequence-first inputs and the attention weights; the cache holds the keys as the scheme attends to them; two encoder
blocks as a decoder-only model and two decoder blocks (memory projected once) decode as they recompute; with zero
positional parameters (zero ALiBi slopes) a decoding decoder block is `nn.TransformerDecoderLayer`; every refusal, with its message,
leaves the caches as they were; and property tests over random prompts, lengths, chunks and positions."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from additive_pos_attn.blocks import ATTENTION_KINDS, positional_attention, positional_parameters
from additive_pos_attn.decoder import PosTransformerDecoderLayer
from additive_pos_attn.testing import decoder_twin, random_block, random_layer
from additive_pos_attn.positions import causal_mask, padded_positions
from additive_pos_attn.rotary import rotate
from strategies import DTYPE, SETTINGS
from cases import close

KINDS = pytest.mark.parametrize('kind', ATTENTION_KINDS)
D, H, MAX_LEN = 16, 4, 16  # every layer's width and heads; the additive table's rows (the relative layer's max_distance + 1)
PADS = (0, 2, 3)  # left padding of the three prompts of 5 tokens in the padded cases: prompts of 5, 3 and 2 tokens



def _layer(kind, device, seed=0, **layer_kwargs):
    "`random_layer` of `kind`, in evaluation mode: every parameter moved off its initial value."
    return random_layer(D, H, kind=kind, max_len=MAX_LEN, seed=seed, device=device, **layer_kwargs).eval()


def _left_padding(B, prompt, total, device, pads=PADS):
    "Key padding mask `(B, total)` of prompts of `prompt` tokens left-padded by `pads`, and its `padded_positions`."
    kpm = torch.arange(total, device=device) < torch.tensor(pads[:B], device=device)[:, None]
    return (kpm, *padded_positions(kpm))


def _decode(step, x, sizes, *, dim=1, prompt=None, **streams):
    """`step` called on `x` in consecutive calls of `sizes` tokens along `dim` (the first: the prompt), each with its
    slice of the `streams` (`(T,)` or `(B, T)` along the last dimension, or None) and the first with `prompt` too; the results."""
    results, start = [], 0
    for n in sizes:
        sliced = {name: None if s is None else s[..., start:start + n] for name, s in streams.items()}
        results.append(step(x.narrow(dim, start, n), **{**sliced, **(prompt if start == 0 and prompt else {})}))
        start += n
    assert start == x.shape[dim], (sizes, x.shape)
    return results


def _self_attend(layer, cache, **kwargs):
    "One decoding step of `layer`: self-attention of the new tokens, causal within the call."
    return lambda tokens, **kw: layer(tokens, tokens, tokens, cache=cache, is_causal=True, **kwargs, **kw)


def _whole(layer, x, positions=None, position_mask=None, key_padding_mask=None, **kwargs):
    "What decoding must give: `layer` on the whole sequence, causally, one set of positions for queries and keys."
    return layer(x, x, x, q_positions=positions, k_positions=positions, q_position_mask=position_mask, k_position_mask=position_mask,
                 key_padding_mask=key_padding_mask, is_causal=True, **kwargs)


def _snapshot(cache):
    "What a call may change in a `KVCache`: its counts and flags, the filled slots, and the masks of every slot."
    n = cache.length
    return dict(length=n, steps=cache.steps, next_position=cache.next_position.tolist(), masked=cache.masked, padded=cache.padded,
                bound=cache.position_bound, keys=cache.keys[:, :, :n].clone(), values=cache.values[:, :, :n].clone(),
                positions=cache.positions[:, :n].clone(), position_mask=cache.position_mask.clone(), padding=cache.padding.clone())


def _assert_unchanged(cache, snapshot):
    after = _snapshot(cache)
    for name, value in snapshot.items():
        assert torch.equal(after[name], value) if isinstance(value, torch.Tensor) else after[name] == value, name


SPLITS = {'token by token': (5, 1, 1, 1), 'in chunks': (5, 2, 1), 'in one call': (8,), 'from one token': (1,) * 8}


@KINDS
@pytest.mark.parametrize('padded', [False, True], ids=['unpadded', 'left-padded'])
@pytest.mark.parametrize('sizes', SPLITS.values(), ids=SPLITS.keys())
def test_decoding_is_recomputing(device, kind, padded, sizes):
    """A prompt of 5 tokens in one call, then 3 more, one or two a call (or all 8 in one call, or one a call from the
    start): at every step the layer on the whole sequence; left-padded prompts of 5, 3 and 2 tokens decode at the
    positions `padded_positions` gives, and the cache holds those positions, the padding and one past each sample's last."""
    layer = _layer(kind, device)
    x = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device, pads=PADS if padded else (0, 0, 0))
    cache = layer.init_cache(batch_size=3, max_length=8)
    results = _decode(_self_attend(layer, cache), x, sizes, key_padding_mask=kpm if padded else None)
    assert all(weights is None for _, weights in results)
    out = torch.cat([out for out, _ in results], dim=1)
    whole = _whole(layer, x, positions, position_mask, kpm)[0] if padded else _whole(layer, x)[0]
    close(out[~kpm], whole[~kpm])
    assert (cache.length, cache.steps, cache.next_position.tolist()) == (8, len(sizes), [8 - p for p in (PADS if padded else (0,) * 3)])
    assert torch.equal(cache.positions, positions) and torch.equal(cache.padding, kpm)
    assert torch.equal(cache.position_mask, position_mask)


def _explicit_positions(kind, form, B, T, device, seed=0):
    "Random positions the layer takes: in the additive table, else any integers, negative too (past ±max_distance: clipped)."
    g = torch.Generator().manual_seed(seed)
    low, high = (0, MAX_LEN) if kind == 'additive' else (-40, 40)
    return torch.randint(low, high, (T,) if form == 'shared' else (B, T), generator=g).to(device)


@KINDS
@pytest.mark.parametrize('form', ['shared', 'per-sample'])
@pytest.mark.parametrize('what', ['positions', 'position mask', 'both'])
def test_explicit_positions_and_masks(device, kind, form, what):
    "Positions `(T,)` or `(B, T)` and position masks given with each call, sliced as the whole sequence's, in calls of 3, 1, 2, 1 tokens."
    layer = _layer(kind, device)
    x = torch.randn(2, 7, D, dtype=DTYPE, device=device)
    positions = _explicit_positions(kind, form, 2, 7, device) if what != 'position mask' else None
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand((7,) if form == 'shared' else (2, 7), generator=g) < 0.5).to(device) if what != 'positions' else None
    cache = layer.init_cache(batch_size=2, max_length=7)
    results = _decode(_self_attend(layer, cache), x, (3, 1, 2, 1), k_positions=positions, k_position_mask=mask)
    close(torch.cat([out for out, _ in results], dim=1), _whole(layer, x, positions, mask)[0])
    expected = torch.arange(7, device=device) if positions is None else positions
    assert torch.equal(cache.positions, expected.expand(2, 7))
    assert cache.next_position.tolist() == (expected.expand(2, 7).amax(-1) + 1).tolist()


@KINDS
def test_positions_count_on_from_an_explicit_prompt(device, kind):
    """A prompt at per-sample offsets (as a continued or shifted sequence), then tokens counted by the cache from one
    past each sample's last position: the layer on the whole sequence at those offsets."""
    layer = _layer(kind, device)
    x = torch.randn(3, 7, D, dtype=DTYPE, device=device)
    offsets = torch.tensor([0, 4, 9], device=device)
    positions = offsets[:, None] + torch.arange(7, device=device)
    cache = layer.init_cache(batch_size=3, max_length=7)
    results = _decode(_self_attend(layer, cache), x, (4, 1, 2), prompt=dict(k_positions=positions[:, :4]))
    close(torch.cat([out for out, _ in results], dim=1), _whole(layer, x, positions)[0])
    assert cache.next_position.tolist() == (offsets + 7).tolist() and cache.position_bound is None


@pytest.mark.parametrize('kind', ['relative', 'rotary', 'alibi'])
def test_positions_count_on_from_a_negative_prompt(device, kind):
    layer = _layer(kind, device)
    x = torch.randn(1, 4, D, dtype=DTYPE, device=device)
    positions = torch.arange(-10, -6, device=device)
    cache = layer.init_cache(batch_size=1, max_length=4)
    results = _decode(_self_attend(layer, cache), x, (3, 1), prompt=dict(k_positions=positions[:3]))
    assert cache.next_position.tolist() == [-6]
    close(torch.cat([out for out, _ in results], dim=1), _whole(layer, x, positions)[0])


@pytest.mark.parametrize('dtype, values, pads', [(torch.uint8, [[0, 5, 6]], [[True, False, False]]),
                                                 (torch.uint8, [[1, 2, 255]], None), (torch.int8, [[1, 2, 127]], None)],
                         ids=['uint8 padding', 'uint8 255', 'int8 127'])
def test_narrow_position_dtypes_count_on(device, dtype, values, pads):
    layer = _layer('rotary', device)
    x = torch.randn(1, 3, D, dtype=DTYPE, device=device)
    kpm = None if pads is None else torch.tensor(pads, device=device)
    cache = layer.init_cache(batch_size=1, max_length=4)
    _self_attend(layer, cache)(x, k_positions=torch.tensor(values, dtype=dtype, device=device), key_padding_mask=kpm)
    assert cache.next_position.tolist() == [max(values[0]) + 1]


@KINDS
def test_attention_masks_cover_every_key_attended_to(device, kind):
    "An `attn_mask` (float with the causal -inf, or bool; `(T_new, L)` or `(B·H, T_new, L)`) over the cached and new keys of each call."
    layer = _layer(kind, device)
    x = torch.randn(2, 6, D, dtype=DTYPE, device=device)
    g = torch.Generator().manual_seed(2)
    causal = causal_mask(6, 6, device)
    masks = [torch.randn(6, 6, generator=g, dtype=DTYPE).to(device).masked_fill(causal, float('-inf')),
             torch.randn(2 * H, 6, 6, generator=g, dtype=DTYPE).to(device).masked_fill(causal, float('-inf')),
             causal | (torch.rand(6, 6, generator=g) < 0.3).to(device).tril(-1)]
    for mask in masks:
        cache = layer.init_cache(batch_size=2, max_length=6)
        results, start = [], 0
        for n in (3, 1, 2):
            tokens = x[:, start:start + n]
            results.append(layer(tokens, tokens, tokens, cache=cache, attn_mask=mask[..., start:start + n, :start + n])[0])
            start += n
        close(torch.cat(results, dim=1), layer(x, x, x, attn_mask=mask)[0])


@KINDS
def test_sequence_first_layer_decodes_as_the_batch_first_one(device, kind):
    layer, seq_first = _layer(kind, device), _layer(kind, device, batch_first=False)
    x = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device)
    cache = seq_first.init_cache(batch_size=3, max_length=8)
    results = _decode(_self_attend(seq_first, cache), x.transpose(0, 1).contiguous(), (5, 2, 1), dim=0, key_padding_mask=kpm)
    assert [tuple(out.shape) for out, _ in results] == [(n, 3, D) for n in (5, 2, 1)]  # (T_new, B, D), as the inputs
    out = torch.cat([out for out, _ in results], dim=0).transpose(0, 1)
    whole = _whole(layer, x, positions, position_mask, kpm)[0]
    close(out[~kpm], whole[~kpm])


@KINDS
@pytest.mark.parametrize('average', [True, False], ids=['averaged', 'per head'])
def test_weights_are_the_recomputed_rows_over_the_filled_keys(device, kind, average):
    "With `need_weights=True` each call returns the rows of its queries over every filled slot, padding (weight 0) included."
    layer = _layer(kind, device)
    x = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device)
    cache = layer.init_cache(batch_size=3, max_length=8)
    results = _decode(_self_attend(layer, cache, need_weights=True, average_attn_weights=average), x, (5, 2, 1), key_padding_mask=kpm)
    whole, whole_weights = _whole(layer, x, positions, position_mask, kpm, need_weights=True, average_attn_weights=average)
    by_query = lambda w: w if average else w.transpose(1, 2)  # (B, T_q, [H,] T_k)
    start = 0
    for out, weights in results:
        end = start + out.shape[1]
        assert weights.shape == ((3, out.shape[1], end) if average else (3, H, out.shape[1], end))
        real = ~kpm[:, start:end]
        close(out[real], whole[:, start:end][real])
        close(by_query(weights)[real], by_query(whole_weights)[:, start:end, ..., :end][real])
        start = end


@KINDS
def test_the_cache_holds_keys_as_the_scheme_attends_to_them(device, kind):
    """Additive: `W_k(x + E[p])`; relative: plain `W_k x` (the bias comes from the positions kept beside them); rotary:
    `W_k x` turned by its position. Values are `W_v x` in every scheme."""
    layer = _layer(kind, device)
    x = torch.randn(2, 5, D, dtype=DTYPE, device=device)
    positions = _explicit_positions(kind, 'per-sample', 2, 5, device)
    cache = layer.init_cache(batch_size=2, max_length=5)
    _self_attend(layer, cache)(x, k_positions=positions)
    (_, w_k, w_v), (_, b_k, b_v) = layer.attn.in_proj_weight.chunk(3), layer.attn.in_proj_bias.chunk(3)
    heads = lambda t, w, b: (t @ w.T + b).unflatten(-1, (H, D // H)).transpose(1, 2)
    keys = heads(x + layer.pos_emb[positions] if kind == 'additive' else x, w_k, b_k)
    if kind == 'rotary': keys = rotate(keys, positions, base=layer.rope_base, interleaved=layer.interleaved)
    close(cache.keys, keys)
    close(cache.values, heads(x, w_v, b_v))
    assert torch.equal(cache.positions, positions)


def _encoder_stack(kind, device):
    "Two `random_block`s of `kind` with their own weights, as a decoder-only model stacks them."
    return [random_block(attention=kind, max_len=MAX_LEN, seed=seed, device=device) for seed in (0, 1)]


def _decoder_stack(kind, device, *, zero=False, count=2):
    """`count` decoder blocks of `kind`, dropout off, every weight drawn (layer norms from N(0, 1)); the positional
    parameters from N(0, 1), or zero (and ALiBi's slopes, else the paper's, zero too)."""
    blocks = []
    for seed in range(count):
        layers = [_layer(kind, device, seed=2 * seed + i) for i in (0, 1)]
        block = PosTransformerDecoderLayer(*layers, 24, dropout=0.0, dtype=DTYPE, device=device)
        with torch.no_grad():
            for norm in (block.norm1, block.norm2, block.norm3): norm.weight.normal_(); norm.bias.normal_()
            for p in (p for layer in layers for p in positional_parameters(layer).values()):
                if zero: p.zero_()
            for layer in layers:
                if zero and kind == 'alibi': layer.slopes.zero_()
        blocks.append(block.eval())
    return blocks


def _stacked(blocks, caches, **kwargs):
    "One decoding step through `blocks`, each with its cache; `kwargs` (the first block's keywords) reach every block."
    def step(x, **kw):
        for block, cache in zip(blocks, caches): x = block(x, cache=cache, **kwargs, **kw)
        return x
    return step


def _memory(device, B=3, S=7):
    "A memory of `S` tokens at positions 2, 3, ..., its last tokens padding in two samples, some without a positional part."
    memory = torch.randn(B, S, D, dtype=DTYPE, device=device)
    padding = torch.arange(S, device=device) >= torch.tensor([S, S - 2, S - 3][:B], device=device)[:, None]
    mask = torch.ones(S, dtype=torch.bool, device=device); mask[1] = False
    return memory, dict(memory_key_padding_mask=padding, memory_positions=torch.arange(S, device=device) + 2, memory_position_mask=mask)


@KINDS
@pytest.mark.parametrize('sizes', [(5, 1, 1, 1), (5, 3)], ids=['token by token', 'in chunks'])
def test_two_encoder_blocks_decode_as_they_recompute(device, kind, sizes):
    "A decoder-only model of two blocks, each with its cache, on left-padded prompts."
    blocks = _encoder_stack(kind, device)
    x = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device)
    caches = [block.init_cache(batch_size=3, max_length=8) for block in blocks]
    out = torch.cat(_decode(_stacked(blocks, caches, is_causal=True), x, sizes, src_key_padding_mask=kpm), dim=1)
    whole = x
    for block in blocks: whole = block(whole, positions=positions, position_mask=position_mask, src_key_padding_mask=kpm, is_causal=True)
    close(out[~kpm], whole[~kpm])


@KINDS
@pytest.mark.parametrize('positions_given', [False, True], ids=['counted positions', 'explicit positions'])
def test_two_decoder_blocks_decode_as_they_recompute(device, kind, positions_given):
    """Two decoder blocks with `DecoderCache`s, left-padded targets, a padded memory with positions and a position mask.
    The memory is projected once: changed in place after the first call, it changes nothing."""
    blocks = _decoder_stack(kind, device)
    tgt = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    memory, memory_kwargs = _memory(device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device)
    if positions_given: positions = _explicit_positions(kind, 'per-sample', 3, 8, device)
    whole = tgt
    for block in blocks:
        whole = block(whole, memory, tgt_positions=positions, tgt_position_mask=position_mask, tgt_key_padding_mask=kpm,
                      tgt_is_causal=True, **memory_kwargs)
    caches = [block.init_cache(batch_size=3, max_length=8) for block in blocks]
    step = _stacked(blocks, caches, tgt_is_causal=True, memory=memory, **memory_kwargs)
    prompt = step(tgt[:, :5], tgt_key_padding_mask=kpm[:, :5], tgt_positions=positions[:, :5] if positions_given else None)
    with torch.no_grad(): memory.normal_()  # the same tensor, other values: the caches hold the first call's projection
    tokens = _decode(step, tgt[:, 5:], (1, 2), tgt_positions=positions[:, 5:] if positions_given else None)
    close(torch.cat([prompt, *tokens], dim=1)[~kpm], whole[~kpm])
    for cache in caches:
        assert (cache.self_attn.length, cache.self_attn.steps, cache.memory.length, cache.memory.steps) == (8, 3, 7, 1)
        assert torch.equal(cache.self_attn.padding, kpm)


@KINDS
def test_zero_tables_decode_as_torchs_decoder_layer(device, kind):
    """With zero positional parameters (ALiBi: zero slopes; rotary: every position mask False) a decoder block decoding with its cache gives
    what `nn.TransformerDecoderLayer` (`decoder_twin`) gives on the whole target."""
    block, = _decoder_stack(kind, device, zero=True, count=1)
    tgt = torch.randn(3, 7, D, dtype=DTYPE, device=device)
    memory, memory_kwargs = _memory(device)
    off = dict(tgt_position_mask=torch.zeros(7, dtype=torch.bool, device=device)) if kind == 'rotary' else {}
    memory_off = dict(memory_position_mask=torch.zeros(7, dtype=torch.bool, device=device)) if kind == 'rotary' else {}
    kwargs = dict(memory=memory, memory_key_padding_mask=memory_kwargs['memory_key_padding_mask'], tgt_is_causal=True, **memory_off)
    cache = block.init_cache(batch_size=3, max_length=7)
    out = torch.cat(_decode(lambda x, **kw: block(x, cache=cache, **kwargs, **kw), tgt, (4, 1, 2), **off), dim=1)
    twin = decoder_twin(block)
    close(out, twin(tgt, memory, tgt_mask=causal_mask(7, 7, device), tgt_is_causal=True,
                     memory_key_padding_mask=memory_kwargs['memory_key_padding_mask']))


def _draw_target(data, kind, device):
    """A random decoding: batch, prompt lengths (left padding), tokens decoded after the prompt in random chunks, and
    positions counted by the cache, given with every call, or given with the prompt only, at random per-sample offsets."""
    B = data.draw(st.integers(1, 3), label='batch')
    lengths = data.draw(st.lists(st.integers(0, 5), min_size=B, max_size=B), label='prompt lengths')
    prompt, new = max(max(lengths), 1), data.draw(st.integers(0, 4), label='tokens decoded')
    sizes = [prompt]
    while sum(sizes) < prompt + new: sizes.append(data.draw(st.integers(1, prompt + new - sum(sizes)), label='chunk'))
    T = prompt + new
    mode = data.draw(st.sampled_from(['counted', 'explicit', 'explicit prompt']), label='positions')
    low, high = (0, MAX_LEN - T) if kind == 'additive' else (-30, 30)
    offsets = data.draw(st.lists(st.integers(low, high), min_size=B, max_size=B), label='offsets') if mode != 'counted' else [0] * B
    if mode == 'explicit prompt': offsets = [o if n else 0 for o, n in zip(offsets, lengths)]  # no real token: nothing to count on from
    kpm = torch.arange(T) < torch.tensor([prompt - n for n in lengths])[:, None]
    positions, position_mask = padded_positions(kpm)
    positions = positions + torch.tensor(offsets)[:, None]
    streams = dict(given=positions if mode == 'explicit' else None, prompt=positions[:, :prompt] if mode == 'explicit prompt' else None)
    move = lambda t: None if t is None else t.to(device)
    return dict(B=B, T=T, sizes=sizes, kpm=kpm.to(device), positions=positions.to(device), position_mask=position_mask.to(device),
                **{k: move(v) for k, v in streams.items()})


def _property(examples, device, check):
    "`check(data, kind, case)` on `examples` derandomised examples of a random kind and `_draw_target`; every one must run."
    seen = []

    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        kind = data.draw(st.sampled_from(ATTENTION_KINDS), label='kind')
        check(data, kind, _draw_target(data, kind, device))
        seen.append(1)

    run()
    assert len(seen) == examples


def test_random_decodings_are_recomputing(device):
    """Property: random kinds, batches, prompts of different lengths, chunks, positions (counted, explicit, or an explicit
    prompt counted on) and weights; decoding with a cache gives the whole sequence's output and weights on real tokens."""
    def check(data, kind, case):
        need_weights = data.draw(st.booleans(), label='need_weights')
        batch_first = data.draw(st.booleans(), label='batch_first')
        layer = _layer(kind, device, seed=data.draw(st.integers(0, 2**16), label='seed'), batch_first=batch_first)
        layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
        x, kpm = torch.randn(case['B'], case['T'], D, dtype=DTYPE, device=device), case['kpm']
        cache = layer.init_cache(batch_size=case['B'], max_length=case['T'])
        prompt = None if case['prompt'] is None else dict(k_positions=case['prompt'])
        results = _decode(_self_attend(layer, cache, need_weights=need_weights), layout(x).contiguous(), case['sizes'],
                          dim=1 if batch_first else 0, prompt=prompt, k_positions=case['given'], key_padding_mask=kpm)
        whole, whole_weights = _whole(layer, layout(x), case['positions'], case['position_mask'], kpm, need_weights=need_weights)
        out = layout(torch.cat([out for out, _ in results], dim=1 if batch_first else 0))
        close(out[~kpm], layout(whole)[~kpm])
        start = 0
        for n, (_, weights) in zip(case['sizes'], results):
            real = ~kpm[:, start:start + n]
            if need_weights: close(weights[real], whole_weights[:, start:start + n, :start + n][real])
            else: assert weights is None
            start += n
        assert torch.equal(cache.positions, case['positions'].expand_as(cache.positions)) and cache.length == case['T']

    _property(80, device, check)


def test_random_decoder_decodings_are_recomputing(device):
    "Property: the same random decodings through a decoder block, with a random memory (padding, positions) projected once."
    def check(data, kind, case):
        B, T, kpm = case['B'], case['T'], case['kpm']
        block, = _decoder_stack(kind, device, count=1)
        S = data.draw(st.integers(1, 6), label='memory length')
        memory_lengths = data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B), label='memory lengths')
        memory, tgt = torch.randn(B, S, D, dtype=DTYPE, device=device), torch.randn(B, T, D, dtype=DTYPE, device=device)
        low, high = (0, MAX_LEN) if kind == 'additive' else (-20, 20)
        memory_kwargs = dict(memory_key_padding_mask=torch.arange(S, device=device) >= torch.tensor(memory_lengths, device=device)[:, None],
                             memory_positions=torch.randint(low, high, (B, S), device=device))
        whole = block(tgt, memory, tgt_positions=case['positions'], tgt_position_mask=case['position_mask'], tgt_key_padding_mask=kpm,
                      tgt_is_causal=True, **memory_kwargs)
        cache = block.init_cache(batch_size=B, max_length=T)
        step = lambda x, **kw: block(x, memory, cache=cache, tgt_is_causal=True, **memory_kwargs, **kw)
        prompt = None if case['prompt'] is None else dict(tgt_positions=case['prompt'])
        out = torch.cat(_decode(step, tgt, case['sizes'], prompt=prompt, tgt_positions=case['given'], tgt_key_padding_mask=kpm), dim=1)
        close(out[~kpm], whole[~kpm])
        assert cache.memory.steps == 1

    _property(30, device, check)


@torch.no_grad()
def test_largest_difference_of_decoding_and_recomputing(device):
    """The largest |cached - recomputed| over real tokens, in float64, across the kinds: layers decoding left-padded
    prompts token by token and in chunks, two encoder blocks and two decoder blocks. Printed (`pytest -s`) and held to 1e-12."""
    largest = {}
    x = torch.randn(3, 8, D, dtype=DTYPE, device=device)
    kpm, positions, position_mask = _left_padding(3, 5, 8, device)
    memory, memory_kwargs = _memory(device)
    for kind in ATTENTION_KINDS:
        diffs = []
        layer = _layer(kind, device)
        whole = _whole(layer, x, positions, position_mask, kpm)[0]
        for sizes in ((5, 1, 1, 1), (5, 2, 1), (1,) * 8):
            cache = layer.init_cache(batch_size=3, max_length=8)
            out = torch.cat([o for o, _ in _decode(_self_attend(layer, cache), x, sizes, key_padding_mask=kpm)], dim=1)
            diffs.append((out - whole)[~kpm].abs().max())
        models = [(_encoder_stack(kind, device), dict(is_causal=True), 'src_',
                   dict(positions=positions, position_mask=position_mask, src_key_padding_mask=kpm)),
                  (_decoder_stack(kind, device), dict(memory=memory, tgt_is_causal=True, **memory_kwargs), 'tgt_',
                   dict(tgt_positions=positions, tgt_position_mask=position_mask, tgt_key_padding_mask=kpm))]
        for blocks, kwargs, prefix, whole_kwargs in models:
            whole = x
            for block in blocks: whole = block(whole, **kwargs, **whole_kwargs)
            caches = [block.init_cache(batch_size=3, max_length=8) for block in blocks]
            out = torch.cat(_decode(_stacked(blocks, caches, **kwargs), x, (5, 1, 2), **{f'{prefix}key_padding_mask': kpm}), dim=1)
            diffs.append((out - whole)[~kpm].abs().max())
        largest[kind] = float(torch.stack(diffs).max())
    print(f"\nlargest |cached - recomputed| in float64 on {device}: {max(largest.values()):.3g} "
          f"({', '.join(f'{kind} {value:.3g}' for kind, value in largest.items())})")
    assert max(largest.values()) <= 1e-12


# Refusals: each names what is wrong, and leaves the cache as it was.

def _prefilled(kind, device, B=2, prompt=3, max_length=6):
    "A layer of `kind`, its cache holding a prompt of `prompt` tokens, a snapshot of it, and a new token `(B, 1, D)`."
    layer = _layer(kind, device)
    cache = layer.init_cache(batch_size=B, max_length=max_length)
    _self_attend(layer, cache)(torch.randn(B, prompt, D, dtype=DTYPE, device=device))
    return layer, cache, _snapshot(cache), torch.randn(B, 1, D, dtype=DTYPE, device=device)


@KINDS
def test_a_full_cache_is_refused(device, kind):
    layer, cache, _, token = _prefilled(kind, device, prompt=4, max_length=5)
    _self_attend(layer, cache)(token)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"^the cache is full: it holds max_length=5 tokens, 5 are written, and step 2 writes 1 more; "
                                         r"make the cache with a larger max_length$"):
        _self_attend(layer, cache)(token)
    _assert_unchanged(cache, before)
    chunk = torch.randn(2, 6, D, dtype=DTYPE, device=device)
    with pytest.raises(ValueError, match=r"^the cache is full: it holds max_length=5 tokens, 0 are written, and step 0 writes 6 more"):
        _self_attend(layer, layer.init_cache(batch_size=2, max_length=5))(chunk)


def test_additive_positions_past_the_table_are_refused(device):
    """Counted positions past `max_len` name the step and the largest position, per sample (a padded prompt goes further);
    after explicit positions too; nothing is written, and explicit positions in the table still decode."""
    small = random_block(attention='additive', max_len=4, device=device).self_attn
    cache = small.init_cache(batch_size=2, max_length=8)
    step = _self_attend(small, cache)
    step(torch.randn(2, 3, D, dtype=DTYPE, device=device), key_padding_mask=torch.tensor([[False] * 3, [True, True, False]], device=device))
    token = torch.randn(2, 1, D, dtype=DTYPE, device=device)
    step(token)  # positions 3 and 1
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"^decoding step 2 would give positions up to 4, past the layer's table of max_len=4 positions: "
                                         r"pass positions, or build the layer with a larger max_len$"):
        step(token)
    _assert_unchanged(cache, before)
    step(token, k_positions=torch.tensor([[0], [2]], device=device))  # explicit positions: accepted, and the count is no longer a bound
    assert cache.position_bound is None and cache.next_position.tolist() == [4, 3]
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"^decoding step 3 would give positions up to 4, past the layer's table of max_len=4"):
        step(token)
    with pytest.raises(ValueError, match=r"k_positions must lie in \[0, max_len=4\), got values from 4 to 4"):
        step(token, k_positions=torch.tensor([4], device=device))
    _assert_unchanged(cache, before)


@KINDS
def test_wrong_caches_and_arguments_are_refused(device, kind):
    layer, cache, before, token = _prefilled(kind, device)
    name = type(layer).__name__
    other = _layer(kind, device)
    memory = torch.randn(2, 4, D, dtype=DTYPE, device=device)
    kpm = torch.zeros(2, 1, dtype=torch.bool, device=device)
    refusals = [
        (TypeError, r"^cache must be a KVCache made by the layer's init_cache, got a dict$", lambda: layer(token, token, token, cache={})),
        (ValueError, r"^cache was made by another layer: each layer decodes with a cache of its own init_cache$",
         lambda: other(token, token, token, cache=cache)),
        (ValueError, r"^cache holds 2 sequences, got a batch of 3$", lambda: _self_attend(layer, cache)(token.repeat(2, 1, 1)[:3])),
        (ValueError, r"^k_positions describes new keys, but key is None: the cache keeps its keys' positions and padding$",
         lambda: layer(token, None, None, cache=cache, q_positions=torch.tensor([3], device=device), k_positions=torch.tensor([3], device=device))),
        (ValueError, r"^k_position_mask describes new keys, but key is None",
         lambda: layer(token, None, None, cache=cache, q_positions=torch.tensor([3], device=device), k_position_mask=kpm[0])),
        (ValueError, r"^key_padding_mask describes new keys, but key is None",
         lambda: layer(token, None, None, cache=cache, q_positions=torch.tensor([3], device=device), key_padding_mask=kpm)),
        (ValueError, r"^with a cache, key and value are both new tokens or both None, got key a torch.float64 Tensor, value None$",
         lambda: layer(token, token, None, cache=cache)),
        (ValueError, r"^with a cache, key and value are both new tokens or both None, got key None, value a torch.float64 Tensor$",
         lambda: layer(token, None, token, cache=cache, q_positions=torch.tensor([3], device=device))),
        (TypeError, r"^with a cache, key_padding_mask must be bool \(True: padding\), got a torch.float64 Tensor$",
         lambda: _self_attend(layer, cache)(token, key_padding_mask=torch.zeros(2, 1, dtype=DTYPE, device=device))),
        (ValueError, r"^with a cache, q_positions is required when query is not key: the cache counts the keys' positions, not the queries'$",
         lambda: layer(token, memory, memory, cache=cache)),
        (ValueError, r"^with a cache, q_positions is required when query is not key", lambda: layer(token, None, None, cache=cache)),
        (ValueError, r"^attn_mask must have shape \(1, 4\) or \(8, 1, 4\), got \(1, 3\)$",
         lambda: layer(token, token, token, cache=cache, attn_mask=torch.zeros(1, 3, dtype=torch.bool, device=device))),
        (ValueError, r"^attn_mask must have shape \(1, 3\) or \(8, 1, 3\), got \(1, 4\)$",  # key None: the cached keys only
         lambda: layer(token, None, None, cache=cache, q_positions=torch.tensor([3], device=device), attn_mask=torch.zeros(1, 4, dtype=torch.bool, device=device))),
    ]
    for error, message, call in refusals:
        with pytest.raises(error, match=message): call()
        _assert_unchanged(cache, before)
    handle = layer.attn.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match=rf"^{name} attends with a cache without calling its attn, so it cannot honour what needs "
                                         r"that call: attn has hooks, which only a call of attn runs$"):
        _self_attend(layer, cache)(token)
    _assert_unchanged(cache, before)
    handle.remove()
    _self_attend(layer, cache)(token)  # and the cache still decodes
    assert cache.length == 4


@KINDS
def test_views_of_one_tensor_are_self_attention(device, kind):
    """Query, key and value that are views of the same memory with the same shape and strides (`x[:, :3]` three times)
    are one input, as one tensor object is: self-attention, which needs no q_positions and decodes as `_self_attend`.
    Views that differ in offset are two inputs: cross-attention, which does."""
    layer = _layer(kind, device)
    x = torch.randn(2, 5, D, dtype=DTYPE, device=device)
    cache, by_views = (layer.init_cache(batch_size=2, max_length=5) for _ in range(2))
    expected = torch.cat([out for out, _ in _decode(_self_attend(layer, cache), x, (3, 1, 1))], dim=1)
    out = [layer(x[:, :3], x[:, :3], x[:, :3], cache=by_views, is_causal=True)[0]]
    out += [layer(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=by_views)[0] for t in (3, 4)]
    close(torch.cat(out, dim=1), expected)
    assert (by_views.length, by_views.steps) == (5, 3) and torch.equal(by_views.positions, cache.positions)
    other = layer.init_cache(batch_size=2, max_length=5)
    with pytest.raises(ValueError, match=r"^with a cache, q_positions is required when query is not key"):
        layer(x[:, :3], x[:, 1:4], x[:, 1:4], cache=other, is_causal=True)
    assert other.length == 0


@KINDS
def test_cached_self_attention_of_several_tokens_needs_is_causal_or_a_mask(device, kind):
    """A cached self-attention call writing more than one token says how they see each other (`is_causal=True` or an
    `attn_mask`), or is refused after the cache and dtype checks, before anything is written; one token needs neither,
    and an explicit mask over the cached and new keys (prefix attention) is what it says."""
    layer, cache, before, token = _prefilled(kind, device)
    chunk = torch.randn(2, 3, D, dtype=DTYPE, device=device)
    refusal = (r"^with a cache, self-attention that writes 3 tokens needs is_causal=True \(each token sees those before it\) "
               r"or an attn_mask \(how the new tokens see each other\), got neither$")
    with pytest.raises(ValueError, match=refusal): layer(chunk, chunk, chunk, cache=cache)
    with pytest.raises(ValueError, match=refusal): layer(chunk, chunk, chunk, cache=cache, is_causal=False, need_weights=True)
    _assert_unchanged(cache, before)
    empty = layer.init_cache(batch_size=2, max_length=6)
    with pytest.raises(ValueError, match=refusal): layer(chunk, chunk, chunk, cache=empty)  # the prompt too
    assert (empty.length, empty.steps) == (0, 0)
    with pytest.raises(ValueError, match=r"^cache was made by another layer"): _layer(kind, device)(chunk, chunk, chunk, cache=cache)
    with pytest.raises(TypeError, match=r"^cache holds keys in torch.float32, got a query in torch.float64"):
        layer(chunk, chunk, chunk, cache=layer.init_cache(batch_size=2, max_length=6, dtype=torch.float32))
    _assert_unchanged(cache, before)
    prefix = ~torch.ones(3, 6, dtype=torch.bool, device=device).tril(3)  # new token i sees the 3 cached keys and new ones up to i
    twin, causal_cache, _, _ = _prefilled(kind, device)  # the same weights and prompt (each is seeded)
    close(layer(chunk, chunk, chunk, cache=cache, attn_mask=prefix)[0], _self_attend(twin, causal_cache)(chunk)[0])
    assert cache.length == causal_cache.length == 6
    (layer, cache, _, token), (twin, causal_cache, _, _) = _prefilled(kind, device), _prefilled(kind, device)
    close(layer(token, token, token, cache=cache)[0], _self_attend(twin, causal_cache)(token)[0])


@KINDS
def test_cross_attention_to_a_cache_attends_to_what_it_holds(device, kind):
    "`key=None` attends from queries at given positions to the cached keys as they are, without writing: as the layer on those keys."
    layer = _layer(kind, device)
    memory, x = torch.randn(2, 5, D, dtype=DTYPE, device=device), torch.randn(2, 3, D, dtype=DTYPE, device=device)
    k_positions = _explicit_positions(kind, 'per-sample', 2, 5, device)
    q_positions = _explicit_positions(kind, 'shared', 2, 3, device, seed=1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)
    cache = layer.init_cache(batch_size=2, max_length=5)
    kwargs = dict(q_positions=q_positions, need_weights=True)
    first = layer(x, memory, memory, cache=cache, k_positions=k_positions, key_padding_mask=padding, **kwargs)
    before = _snapshot(cache)
    again = layer(x, None, None, cache=cache, **kwargs)
    _assert_unchanged(cache, before)
    whole = layer(x, memory, memory, k_positions=k_positions, key_padding_mask=padding, **kwargs)
    for result in (first, again): close(result[0], whole[0]); close(result[1], whole[1])


@KINDS
def test_refused_decoder_calls_leave_both_caches_as_they_were(device, kind):
    """Another memory (or another memory argument) than the first call's is refused before anything is written; a call
    refused by the cross-attention after the self-attention wrote is undone; a refused first call leaves no memory."""
    block, = _decoder_stack(kind, device, count=1)
    tgt = torch.randn(2, 4, D, dtype=DTYPE, device=device)
    memory, memory_kwargs = _memory(device, B=2, S=5)
    cache = block.init_cache(batch_size=2, max_length=4)
    with pytest.raises(ValueError, match=r"^attn_mask must have shape \(2, 5\) or \(8, 2, 5\), got \(2, 4\)$"):  # refused first call
        block(tgt[:, :2], memory, memory_mask=torch.zeros(2, 4, dtype=torch.bool, device=device), cache=cache, tgt_is_causal=True, **memory_kwargs)
    assert cache.memory is None and cache.self_attn.length == 0 and cache.self_attn.steps == 0
    step = lambda x, **kw: block(x, cache=cache, tgt_is_causal=True, **kw)
    out = [step(tgt[:, :2], memory=memory, **memory_kwargs)]
    self_before, memory_before = _snapshot(cache.self_attn), _snapshot(cache.memory)
    token = tgt[:, 2:3]
    others = [dict(memory=memory.clone(), **memory_kwargs), dict(memory=memory, **{**memory_kwargs, 'memory_key_padding_mask': None}),
              dict(memory=memory, **{**memory_kwargs, 'memory_positions': memory_kwargs['memory_positions'].clone()}),
              dict(memory=memory, **{**memory_kwargs, 'memory_position_mask': None})]
    for kwargs in others:
        with pytest.raises(ValueError, match=r"^the cache holds the memory of its first call, projected once: pass the same memory, "
                                             r"memory_key_padding_mask, memory_positions and memory_position_mask to every call, or start a new cache$"):
            step(token, **kwargs)
        _assert_unchanged(cache.self_attn, self_before); _assert_unchanged(cache.memory, memory_before)
    with pytest.raises(ValueError, match=r"^attn_mask must have shape \(1, 5\) or \(8, 1, 5\), got \(1, 4\)$"):  # after self_attn wrote
        step(token, memory=memory, memory_mask=torch.zeros(1, 4, dtype=torch.bool, device=device), **memory_kwargs)
    _assert_unchanged(cache.self_attn, self_before); _assert_unchanged(cache.memory, memory_before)
    with pytest.raises(TypeError, match=r"^cache must be a DecoderCache made by the block's init_cache, got KVCache$"):
        block(token, memory, cache=cache.self_attn, **memory_kwargs)
    out += _decode(lambda x, **kw: step(x, memory=memory, **memory_kwargs, **kw), tgt[:, 2:], (1, 1))  # the refusals left no trace
    close(torch.cat(out, dim=1), block(tgt, memory, tgt_is_causal=True, **memory_kwargs))


# Options of the wrapped module, dtypes, and causal cross-attention: found in review

def _with_options(kind, device, **options):
    "A layer of `kind` with `nn.MultiheadAttention` options, every parameter drawn (positional ones from N(0, 1))."
    torch.manual_seed(3)
    layer = positional_attention(kind, D, H, max_len=MAX_LEN, dtype=DTYPE, device=device, **options)
    with torch.no_grad():
        for p in layer.parameters(): p.normal_()
    return layer.eval()


@KINDS
@pytest.mark.parametrize('options', [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)],
                         ids=['add_bias_kv', 'add_zero_attn', 'both'])
def test_extra_keys_decode_as_recomputed(device, kind, options):
    "The keys of add_bias_kv and add_zero_attn follow every cached key, seen by every query, as in the whole sequence."
    layer = _with_options(kind, device, **options)
    x = torch.randn(2, 6, D, dtype=DTYPE, device=device)
    cache = layer.init_cache(batch_size=2, max_length=6)
    results = _decode(_self_attend(layer, cache, need_weights=True), x, (3, 1, 2))
    close(torch.cat([out for out, _ in results], dim=1), _whole(layer, x)[0])


@KINDS
def test_cross_attention_with_kdim_vdim_decodes(device, kind):
    "A cross-attention layer with keys and values of other widths writes the memory once and attends to it at every step."
    options = dict(vdim=6) if kind == 'additive' else dict(kdim=5, vdim=6)
    layer = _with_options(kind, device, **options)
    x = torch.randn(2, 4, D, dtype=DTYPE, device=device)
    memory = torch.randn(2, 7, options.get('kdim', D), dtype=DTYPE, device=device)
    values = torch.randn(2, 7, 6, dtype=DTYPE, device=device)
    cache, positions = layer.init_cache(batch_size=2, max_length=7), torch.arange(4, device=device) + 2
    first = layer(x[:, :2], memory, values, cache=cache, q_positions=positions[:2])[0]
    later = [layer(x[:, t:t + 1], None, None, cache=cache, q_positions=positions[t:t + 1])[0] for t in (2, 3)]
    close(torch.cat([first, *later], dim=1), layer(x, memory, values, q_positions=positions)[0])


def test_caches_and_queries_of_another_dtype_are_refused(device):
    "A query or a cache in another dtype than the layer's is refused by name, before anything is written."
    layer = _layer('rotary', device)
    x = torch.randn(2, 3, D, dtype=DTYPE, device=device)
    cache = layer.init_cache(batch_size=2, max_length=6, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"cache holds keys in torch.float32, got a query in torch.float64: make the cache with dtype=torch.float64"):
        layer(x, x, x, cache=cache)
    assert (cache.length, cache.steps) == (0, 0)
    with pytest.raises(TypeError, match=r"query must have the layer's dtype torch.float64 \(or run under autocast\), got torch.float32"):
        xf = x.float(); layer(xf, xf, xf, cache=layer.init_cache(batch_size=2, max_length=6))


def test_causal_cross_attention_with_a_cache_is_refused(device):
    "New queries are the last keys only in self-attention: a causal cross-attention with a cache needs its mask given."
    layer = _layer('relative', device)
    x, memory = torch.randn(2, 3, D, dtype=DTYPE, device=device), torch.randn(2, 5, D, dtype=DTYPE, device=device)
    cache = layer.init_cache(batch_size=2, max_length=5)
    with pytest.raises(ValueError, match=r"with a cache, is_causal=True is for self-attention \(query is key\)"):
        layer(x, memory, memory, cache=cache, q_positions=torch.arange(3, device=device), is_causal=True)
    assert cache.length == 0
