"""The comparison chapter's helpers beyond its examples: the look-back task's targets at every length and range,
`stretch_tables` leaving the model alone, `accuracy_by_length` refusing or stretching only past the table, and a
scheme of offsets carrying what it learned on short sequences to longer ones."""
import functools

import pytest
import torch

from additive_pos_attn.comparison import (accuracy_by_length, accuracy_table, lookback_batch, stretch_tables,
                                          train_schemes)
from additive_pos_attn.demo import ToyModel


@pytest.mark.parametrize('length, k', [(4, 3), (9, 1), (30, 7)])
def test_lookback_targets_are_the_tokens_k_back(length, k):
    tokens, targets = lookback_batch(5, length, vocab_size=11, k=k, generator=torch.Generator().manual_seed(length))
    assert tokens.shape == targets.shape == (5, length) and tokens.min() >= 0 and tokens.max() < 11
    for i in range(length): assert torch.equal(targets[:, i], tokens[:, i - k] if i >= k else torch.full((5,), -100))


def test_lookback_is_reproducible_and_draws_lengths_from_the_range():
    batch = lambda seed: lookback_batch(3, (5, 9), generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(batch(2), batch(2)))
    g = torch.Generator().manual_seed(0)
    assert {lookback_batch(1, (5, 9), generator=g)[0].shape[1] for _ in range(200)} == set(range(5, 10))
    with pytest.raises(ValueError, match=r'k must be a positive int, got 0'): lookback_batch(1, 5, k=0)
    with pytest.raises(ValueError, match=r'length must exceed k=3, so that some token has a target, got 2'): lookback_batch(1, (2, 2))


def test_stretch_tables_resamples_a_copy_of_every_block():
    torch.manual_seed(0)
    model = ToyModel(num_layers=2, d_model=8, num_heads=2)
    with torch.no_grad():
        for block in model.blocks: block.self_attn.pos_emb.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stretched = stretch_tables(model, 40)
    assert [b.self_attn.pos_emb.shape for b in stretched.blocks] == [(40, 8)] * 2 and stretched.max_len == 40
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.max_len == 16
    assert stretched(torch.randint(0, 16, (2, 40))).shape == (2, 40, 16)


def test_accuracy_by_length_refuses_only_past_the_table():
    torch.manual_seed(0)
    additive, relative = ToyModel(d_model=8, num_heads=2), ToyModel(d_model=8, num_heads=2, attention='relative')
    refused = accuracy_by_length(additive, (10, 16, 17, 40), n=20)
    assert refused[17] is None and refused[40] is None and all(0 <= refused[n] <= 1 for n in (10, 16))
    stretched = accuracy_by_length(additive, (10, 16, 17, 40), n=20, stretch=True)
    assert stretched[10] == refused[10] and stretched[16] == refused[16] and 0 <= stretched[40] <= 1
    assert None not in accuracy_by_length(relative, (10, 40), n=20).values()
    assert '| a | refused | 50.0% |' in accuracy_table({'a': {1: None, 2: 0.5}})


def test_an_offset_learned_on_short_sequences_holds_on_longer_ones():
    "A relative model trained on 3 to 8 tokens fetches the token 2 back in most places of sequences of 16."
    task = functools.partial(lookback_batch, length=(3, 8), k=2)
    model = train_schemes(('relative',), 200, progress=False, task=task, max_len=8, d_model=16, num_heads=2)['relative']
    accuracy = accuracy_by_length(model, (8, 16), k=2, n=200)
    assert accuracy[8] > 0.99 and accuracy[16] > 0.8, accuracy
