"""`generate` and its loop exactly: greedy decoding with the cache equals recomputing, token for token, for every scheme,
with and without left padding, and the float64 logits of every step agree to 1e-12; seeded sampling draws the same
tokens with and without the cache; `top_k=1` sampling is greedy; a left-padded batch generates what each prompt
generates alone; eos and pad; every refusal with its message; `filter_logits` against a reference written out with
Python lists; sampling frequencies; the toy encoder-decoder generating through the same loop."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from additive_pos_attn import generate
from additive_pos_attn.blocks import ATTENTION_KINDS
from additive_pos_attn.generation import filter_logits, generation_loop, next_tokens
from strategies import SETTINGS
from cases import LM_SIZES, left_padded, lm

V = LM_SIZES[0]

KINDS = pytest.mark.parametrize('kind', ATTENTION_KINDS)


pytestmark = pytest.mark.usefixtures('one_thread')


def both(model, prompt, n, **kwargs):
    "`generate` with the cache and without: `(tokens, logits)` of each."
    return [generate(model, prompt, n, use_cache=c, output_logits=True, **kwargs) for c in (True, False)]


def largest_difference(a, b) -> float:
    return (a - b).abs().max().item()


@KINDS
@pytest.mark.parametrize('padded', [False, True], ids=['unpadded', 'left-padded'])
def test_greedy_with_the_cache_is_recomputing(kind, padded, device):
    model = lm(kind, device=device)
    prompt, padding = left_padded([6, 3, 1] if padded else [6, 6, 6], 6, device)
    (tokens, logits), (tokens_ref, logits_ref) = both(model, prompt, 9, padding_mask=padding if padded else None)
    assert tokens.shape == (3, 15) and logits.shape == (3, 9, V) and torch.equal(tokens[:, :6], prompt)
    assert torch.equal(tokens, tokens_ref)
    assert largest_difference(logits, logits_ref) <= 1e-12
    assert torch.equal(logits.argmax(-1), tokens[:, 6:])


def test_largest_difference_of_cached_and_recomputed_logits():
    """The largest |cached - recomputed| float64 logit over every scheme, padded and not, 12 steps: printed
    (`pytest -s`) and held to 1e-12."""
    largest = {}
    for kind in ATTENTION_KINDS:
        model = lm(kind)
        for lengths in ([5, 5], [5, 2]):
            prompt, padding = left_padded(lengths, 5)
            (_, logits), (_, reference) = both(model, prompt, 12, padding_mask=padding)
            largest[kind] = max(largest.get(kind, 0.0), largest_difference(logits, reference))
    print('largest |cached - recomputed| logit:', {k: f'{v:.1e}' for k, v in largest.items()})
    assert max(largest.values()) <= 1e-12


@settings(max_examples=25, **SETTINGS)
@given(st.data())
def test_random_generations_are_exact(data):
    """Property: random scheme, batch, prompt lengths (left padding), steps and sampling options; greedy and seeded
    sampling give the same tokens with and without the cache, and the same float64 logits to 1e-12."""
    kind = data.draw(st.sampled_from(ATTENTION_KINDS), label='kind')
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label='prompt lengths')
    n = data.draw(st.integers(1, 8), label='max_new_tokens')
    options = dict(do_sample=data.draw(st.booleans(), label='do_sample'),
                   temperature=data.draw(st.sampled_from([0.5, 1.0, 2.0]), label='temperature'),
                   top_k=data.draw(st.sampled_from([None, 1, 3, V]), label='top_k'),
                   top_p=data.draw(st.sampled_from([None, 0.3, 0.9, 1.0]), label='top_p'))
    seed = data.draw(st.integers(0, 2**16), label='seed')
    model = lm(kind, seed=seed % 7, num_layers=1)
    prompt, padding = left_padded(lengths, max(lengths), seed=seed)
    (tokens, logits), (tokens_ref, logits_ref) = (
        generate(model, prompt, n, padding_mask=padding, use_cache=c, output_logits=True,
                 generator=torch.Generator().manual_seed(seed), **options) for c in (True, False))
    assert torch.equal(tokens, tokens_ref)
    assert largest_difference(logits, logits_ref) <= 1e-12


@KINDS
def test_seeded_sampling_with_the_cache_is_recomputing(kind):
    model = lm(kind)
    prompt, padding = left_padded([5, 2, 4], 5)
    draws = [generate(model, prompt, 10, padding_mask=padding, do_sample=True, temperature=1.3, top_k=8, top_p=0.9,
                      use_cache=c, generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(*draws)
    again = generate(model, prompt, 10, padding_mask=padding, do_sample=True, temperature=1.3, top_k=8, top_p=0.9,
                     generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[0])
    other = generate(model, prompt, 10, padding_mask=padding, do_sample=True, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, draws[0])


@KINDS
def test_top_k_1_sampling_is_greedy(kind):
    model = lm(kind)
    prompt, padding = left_padded([5, 3], 5)
    greedy = generate(model, prompt, 10, padding_mask=padding)
    for temperature in (0.3, 1.0, 5.0):
        sampled = generate(model, prompt, 10, padding_mask=padding, do_sample=True, top_k=1, temperature=temperature,
                           generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled, greedy)
    assert torch.equal(generate(model, prompt, 10, padding_mask=padding, temperature=9.0, top_k=2, top_p=0.1), greedy)


@KINDS
def test_a_left_padded_batch_is_each_prompt_alone(kind, device):
    model = lm(kind, device=device)
    lengths = [6, 1, 4, 2]
    prompt, padding = left_padded(lengths, 6, device)
    for use_cache in (True, False):
        together, logits = generate(model, prompt, 7, padding_mask=padding, use_cache=use_cache, output_logits=True)
        for row, n in enumerate(lengths):
            alone, alone_logits = generate(model, prompt[row:row + 1, 6 - n:], 7, use_cache=use_cache, output_logits=True)
            assert torch.equal(together[row, 6 - n:], alone[0])
            assert largest_difference(logits[row], alone_logits[0]) <= 1e-12
            assert (together[row, :6 - n] == 0).all()  # the padding, as it came


def test_eos_and_pad():
    "After eos a sequence gets pad (or eos without one); the loop stops when every sequence has emitted eos."
    model = lm('rotary')
    prompt, _ = left_padded([4, 4, 4], 4)
    free, logits = generate(model, prompt, 10, output_logits=True)
    eos = int(free[0, 6])  # the third token generated for the first sequence
    ends = [(free[row, 4:].tolist() + [eos]).index(eos) + 1 for row in range(3)]  # tokens up to eos, or 11
    for pad, fill in ((0, 0), (None, eos)):
        tokens, stopped_logits = generate(model, prompt, 10, eos_token_id=eos, pad_token_id=pad, output_logits=True)
        expected = free.clone()
        for row, end in enumerate(ends): expected[row, 4 + end:] = fill
        assert torch.equal(tokens, expected)
        steps = min(max(ends), 10)
        assert stopped_logits.shape == (3, steps, V)
        for row, end in enumerate(ends):  # after its eos a row reads pad, not what it read before, so it differs
            assert largest_difference(stopped_logits[row, :end], logits[row, :end]) <= 1e-12
    cached, recomputed = (generate(model, prompt, 10, eos_token_id=eos, pad_token_id=0, use_cache=c) for c in (True, False))
    assert torch.equal(cached, recomputed)


def test_the_loop_stops_when_every_sequence_has_ended():
    calls = []
    def count_on(tokens, new):
        calls.append((tokens.shape[1], new))
        return F.one_hot((tokens[:, -1].long() + 1) % 6, 6).double()
    tokens, logits = generation_loop(count_on, torch.tensor([[0], [3]]), 8, eos_token_id=4, pad_token_id=0)
    assert tokens.tolist() == [[0, 1, 2, 3, 4, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0, 0]]
    assert calls == [(1, 1), (2, 1), (3, 1), (4, 1)] and logits.shape == (2, 4, 6)
    tokens, _ = generation_loop(count_on, torch.tensor([[0], [3]], dtype=torch.int32), 2)
    assert tokens.dtype == torch.int32 and tokens.tolist() == [[0, 1, 2], [3, 4, 5]]


def _reference_filter(logits: list, temperature, top_k, top_p) -> list:
    "Hugging Face's temperature, top-k and top-p warpers on one row, written out with Python lists."
    x = [v / temperature for v in logits]
    if top_k is not None and top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if top_p is not None and top_p < 1:
        finite = [v for v in x if v != -math.inf]
        top = max(finite)
        total = sum(math.exp(v - top) for v in finite)
        order = sorted(range(len(x)), key=lambda i: -x[i])
        kept, mass = set(), 0.0
        for i in order:
            if mass >= top_p: break
            kept.add(i); mass += (math.exp(x[i] - top) / total) if x[i] != -math.inf else 0.0
        x = [v if i in kept else -math.inf for i, v in enumerate(x)]
    return x


def test_filter_logits_on_fixed_logits():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]], dtype=torch.float64)
    inf = -math.inf
    assert filter_logits(logits, top_k=2).tolist() == [[2.0, inf, inf, inf, 3.0, inf]]
    assert filter_logits(logits, temperature=0.5).tolist() == [[4.0, 2.0, 1.0, -2.0, 6.0, 0.0]]
    probs = logits.softmax(-1)[0].tolist()  # 3.0: 0.61, 2.0: 0.22, 1.0: 0.08, ...
    assert filter_logits(logits, top_p=probs[4]).tolist() == [[inf, inf, inf, inf, 3.0, inf]]  # reaches p alone
    assert filter_logits(logits, top_p=probs[4] + 1e-9).tolist() == [[2.0, inf, inf, inf, 3.0, inf]]
    assert filter_logits(logits, top_p=1.0).tolist() == logits.tolist()
    assert filter_logits(logits, top_k=3, top_p=0.99).tolist() == [[2.0, 1.0, inf, inf, 3.0, inf]]  # k first, then p
    ties = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert filter_logits(ties, top_k=2).isfinite().tolist() == [True, True, True, False]  # ties with the k-th are kept


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12, unique=True), st.sampled_from([0.25, 0.7, 1.0, 3.0]),
       st.one_of(st.none(), st.integers(1, 13)), st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_filter_logits_is_the_reference(logits, temperature, top_k, top_p):
    ours = filter_logits(torch.tensor(logits, dtype=torch.float64), temperature=temperature, top_k=top_k, top_p=top_p)
    reference = _reference_filter(logits, temperature, top_k, top_p)
    # the kept sets agree wherever p is not within rounding of a partial sum
    assert ours.isfinite().tolist() == [v != -math.inf for v in reference] or _near_a_boundary(logits, temperature, top_k, top_p)
    kept = ours.isfinite()
    assert kept.any()
    torch.testing.assert_close(ours[kept], torch.tensor(logits, dtype=torch.float64)[kept] / temperature, rtol=0, atol=1e-12)


def _near_a_boundary(logits, temperature, top_k, top_p) -> bool:
    if top_p is None: return False
    x = filter_logits(torch.tensor(logits, dtype=torch.float64), temperature=temperature, top_k=top_k)
    sums = x.softmax(-1).sort(descending=True).values.cumsum(-1)
    return bool(((sums - top_p).abs() < 1e-12).any())


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0]).expand(20000, 6)
    g = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, do_sample=True, temperature=0.8, top_k=4, top_p=0.9, generator=g)
    frequencies = torch.bincount(drawn, minlength=6).double() / len(drawn)
    expected = filter_logits(logits[0].double(), temperature=0.8, top_k=4, top_p=0.9).softmax(-1)
    assert (frequencies[expected == 0] == 0).all()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


def test_refusals():
    model = lm('additive')
    prompt, padding = left_padded([4, 2], 4)
    g = generate
    cases = [
        (TypeError, r"prompt must be an integer Tensor of token ids, got torch.float32", lambda: g(model, torch.zeros(1, 3), 2)),
        (TypeError, r"prompt must be a Tensor of token ids, got list", lambda: g(model, [[1, 2]], 2)),
        (ValueError, r"prompt must be \(B, T\) with T >= 1, got shape \(4,\)", lambda: g(model, prompt[0], 2)),
        (ValueError, r"max_new_tokens must be a positive int, got 0", lambda: g(model, prompt, 0)),
        (ValueError, r"max_new_tokens must be a positive int, got -2", lambda: g(model, prompt, -2)),
        (TypeError, r"max_new_tokens must be an int, got float 3.0", lambda: g(model, prompt, 3.0)),
        (ValueError, r"temperature must be positive, got 0", lambda: g(model, prompt, 2, do_sample=True, temperature=0)),
        (ValueError, r"temperature must be positive, got -0.5", lambda: g(model, prompt, 2, temperature=-0.5)),
        (TypeError, r"temperature must be a number, got str 'hot'", lambda: g(model, prompt, 2, temperature='hot')),
        (ValueError, r"prompt must hold token ids in \[0, vocab_size=23\), got values from 1 to 23",
         lambda: g(model, torch.tensor([[1, 2, 3, 23]]), 2)),
        (TypeError, r"temperature must be a number, got str 'hot'", lambda: g(model, prompt, 2, do_sample=True, temperature='hot')),
        (ValueError, r"top_p must be in \(0, 1\], got 0", lambda: g(model, prompt, 2, do_sample=True, top_p=0)),
        (ValueError, r"top_p must be in \(0, 1\], got 1.2", lambda: g(model, prompt, 2, top_p=1.2)),
        (ValueError, r"top_k must be a positive int, got 0", lambda: g(model, prompt, 2, do_sample=True, top_k=0)),
        (TypeError, r"top_k must be an int, got float 2.5", lambda: g(model, prompt, 2, top_k=2.5)),
        (TypeError, r"do_sample must be a bool, got str 'yes'", lambda: g(model, prompt, 2, do_sample='yes')),
        (TypeError, r"use_cache must be a bool, got int 1", lambda: g(model, prompt, 2, use_cache=1)),
        (ValueError, r"eos_token_id must be a non-negative int, got -1", lambda: g(model, prompt, 2, eos_token_id=-1)),
        (TypeError, r"pad_token_id must be an int or None, got float 0.0", lambda: g(model, prompt, 2, eos_token_id=1, pad_token_id=0.0)),
        (TypeError, r"padding_mask must be a bool Tensor \(True at padding\), got torch.int64",
         lambda: g(model, prompt, 2, padding_mask=padding.long())),
        (ValueError, r"padding_mask must have the shape of prompt, \(2, 4\), got \(2, 3\)",
         lambda: g(model, prompt, 2, padding_mask=padding[:, 1:])),
        (ValueError, r"padding_mask must pad on the left", lambda: g(model, prompt, 2, padding_mask=padding.flip(-1))),
        (ValueError, r"padding_mask must pad on the left.*a row of padding",
         lambda: g(model, prompt, 2, padding_mask=torch.tensor([[True] * 4, [False] * 4]))),
        (ValueError, r"a prompt of 4 tokens and max_new_tokens=14 make the model read 17 tokens, past its max_len=16",
         lambda: g(model, prompt, 14)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message): call()
    assert generate(model, prompt, 13).shape == (2, 17)  # reads 16 tokens: the last is never read
    short = left_padded([2, 1], 4)
    assert generate(model, short[0], 15, padding_mask=short[1]).shape == (2, 19)  # the real tokens count, not the padding


def test_the_toy_encoder_decoder_generates_through_the_same_loop(monkeypatch):
    from additive_pos_attn import demo
    from additive_pos_attn.demo import ToySeq2Seq, reversal_batch
    assert demo.generation_loop is generation_loop
    calls = []
    monkeypatch.setattr(demo, 'generation_loop', lambda *args, **kwargs: calls.append(1) or generation_loop(*args, **kwargs))
    torch.manual_seed(0)
    model = ToySeq2Seq().eval()
    source, _ = reversal_batch(3, 16, torch.Generator().manual_seed(0))
    tokens, logits = demo.seq2seq_generate(model, source, 4)
    assert calls == [1] and tokens.shape == (3, 4) and logits.shape == (3, 4, 16)


def test_a_padded_prompt_wider_than_the_table_generates_with_the_cache():
    "Padding takes no position: a left-padded prompt wider than the additive table decodes as it recomputes."
    model = lm('additive')
    prompt, padding = left_padded([3, 2], LM_SIZES[3] + 2)
    tokens = generate(model, prompt, 6, padding_mask=padding)
    assert torch.equal(tokens, generate(model, prompt, 6, padding_mask=padding, use_cache=False))
