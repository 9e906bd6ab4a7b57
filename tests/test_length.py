"""The length chapter's tools (`additive_pos_attn.length`) on small float64 models: a rotary model rescaled at a
factor of 1 (and 'dynamic' within its original length) is the plain model, linear interpolation reads stretched
positions, a resampled additive model is the original at the original length and takes longer windows, the scores
per length and per position agree with `bits_per_char` and with a loop by hand, and bad arguments are refused by
name."""
import math

import pytest
import torch
import torch.nn.functional as F

from additive_pos_attn.length import (ROPE_TYPES, length_bits, length_schemes, length_study, length_table,
                                      length_variants, models_at, plot_length_bits, plot_position_bits,
                                      position_bits, resampled, rescaled, scaling_for)
from additive_pos_attn.lm import PosTransformerLM
from additive_pos_attn.text import bits_per_char

from cases import DTYPE, LM_SIZES, lm

V, D, H, MAX_LEN = LM_SIZES
TOKENS = torch.randint(0, V, (2, 3 * MAX_LEN), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, V, (8 * MAX_LEN + 1,), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_rescaled_at_factor_one_is_the_plain_model(one_thread):
    model = lm('rotary')
    for rope_type in ROPE_TYPES:
        scaled = rescaled(model, scaling_for(rope_type, MAX_LEN, MAX_LEN))
        assert scaled.embed.weight.dtype == DTYPE
        T = MAX_LEN if rope_type == 'dynamic' else TOKENS.shape[1]  # 'dynamic' scales past the original length
        torch.testing.assert_close(scaled(TOKENS[:, :T]), model(TOKENS[:, :T]), rtol=0, atol=1e-12)
        assert all(torch.equal(a, b) for a, b in zip(scaled.state_dict().values(), model.state_dict().values()))
    torch.testing.assert_close(rescaled(model, None)(TOKENS), model(TOKENS), rtol=0, atol=0)


@torch.no_grad()
def test_dynamic_scaling_changes_nothing_within_the_original_length(one_thread):
    model = lm('rotary')
    scaled = rescaled(model, scaling_for('dynamic', 4 * MAX_LEN, MAX_LEN))
    torch.testing.assert_close(scaled(TOKENS[:, :MAX_LEN]), model(TOKENS[:, :MAX_LEN]), rtol=0, atol=1e-12)


@torch.no_grad()
def test_linear_interpolation_reads_stretched_positions(one_thread):
    model = lm('rotary')
    for factor in (2, 4):
        scaled = rescaled(model, scaling_for('linear', factor * MAX_LEN, MAX_LEN))
        T = TOKENS.shape[1]
        torch.testing.assert_close(scaled(TOKENS, positions=factor * torch.arange(T)), model(TOKENS), rtol=0, atol=1e-12)


@torch.no_grad()
def test_resampled_is_the_original_at_its_length_and_takes_longer_windows(one_thread):
    model = lm('additive')
    same = resampled(model, MAX_LEN)
    torch.testing.assert_close(same(TOKENS[:, :MAX_LEN]), model(TOKENS[:, :MAX_LEN]), rtol=0, atol=0)
    longer = resampled(model, 3 * MAX_LEN)
    assert longer.max_len == 3 * MAX_LEN and model.max_len == MAX_LEN and not longer.training
    assert longer(TOKENS).shape == (2, 3 * MAX_LEN, V)
    for old, new in zip(model.blocks, longer.blocks):
        table, stretched = old.self_attn.pos_emb, new.self_attn.pos_emb
        assert stretched.shape == (3 * MAX_LEN, D) and stretched.dtype == DTYPE
        torch.testing.assert_close(stretched[[0, -1]], table[[0, -1]], rtol=0, atol=1e-12)  # the ends stay put
    others = {k: v for k, v in longer.state_dict().items() if not k.endswith('pos_emb')}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    with pytest.raises(ValueError, match=r"exceeds max_len=16"): model(TOKENS)


@torch.no_grad()
def test_scores_agree_with_bits_per_char_and_a_loop(one_thread):
    model = lm('alibi')
    scores = length_bits(model, IDS, [MAX_LEN, 4 * MAX_LEN], tokens_per_batch=40)
    # bits_per_char sums float32 logits: equal to the batching's rounding
    for length, value in scores.items(): assert math.isclose(value, bits_per_char(model, IDS, length), rel_tol=1e-6)
    curve = position_bits(model, IDS, 2 * MAX_LEN, batch_size=3)
    assert math.isclose(curve.mean().item(), bits_per_char(model, IDS, 2 * MAX_LEN), rel_tol=1e-6)
    by_hand = torch.zeros(2 * MAX_LEN, dtype=torch.float64)
    for start in range(0, len(IDS) - 1, 2 * MAX_LEN):
        window = IDS[start:start + 2 * MAX_LEN + 1]
        by_hand += F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction='none')
    torch.testing.assert_close(curve, by_hand / 4 / math.log(2), rtol=1e-12, atol=0)


def test_models_at_each_length_and_a_small_study(one_thread):
    models = {'additive': lm('additive'), 'rotary': lm('rotary')}
    variants = length_variants(MAX_LEN)
    assert list(models_at(models, MAX_LEN, variants)) == ['additive', 'additive + resampled', 'rotary',
                                                          *[f'rotary + {t}' for t in ROPE_TYPES]]
    assert 'additive' not in models_at(models, 2 * MAX_LEN, variants)
    schemes = {k: v for k, v in length_schemes(2, context=MAX_LEN).items() if k in ('additive', 'rotary')}
    kwargs = dict(context=MAX_LEN, factors=(1, 2), steps=2, batch_size=2, d_model=8, num_heads=2, num_layers=1,
                  schemes=schemes, variants={'additive + resampled': variants['additive + resampled']})
    table, trained = length_study(IDS, IDS, V, **kwargs)
    assert list(table) == ['additive', 'additive + resampled', 'rotary'] and math.isnan(table['additive'][32])
    assert table['additive'][16] == table['additive + resampled'][16]
    assert table['rotary'] == length_bits(trained['rotary'], IDS, [16, 32])
    assert length_study(IDS, IDS, V, **kwargs)[0] == table  # the same seed, the same models
    assert length_table(table).splitlines()[3] == '| additive + resampled | ' + ' | '.join(
        f'{v:.3f}' for v in table['additive + resampled'].values()) + ' |'


def test_schemes_and_scalings():
    schemes = length_schemes(4)
    assert list(schemes) == ['none', 'additive', 'relative', 'T5 buckets', 'rotary', 'alibi']
    assert torch.equal(schemes['none']['slopes'], torch.zeros(4))
    assert schemes['T5 buckets'] == dict(attention='relative', num_buckets=32, max_distance=128, bidirectional=False)
    assert scaling_for('llama3', 512, 128) == dict(rope_type='llama3', factor=4.0, original_max_position_embeddings=128,
                                                   low_freq_factor=1.0, high_freq_factor=4.0)
    model = PosTransformerLM(V, 8, 2, 1, attention='rotary')
    for name, (base, make) in length_variants(16).items():
        if base == 'rotary': assert make(model, 48).blocks[0].self_attn.rope_scaling['factor'] == 3.0


def test_bad_arguments_are_refused_by_name():
    rotary, additive = lm('rotary'), lm('additive')
    with pytest.raises(TypeError, match=r"lengths must be a non-empty sequence of positive ints, got '16'"):
        length_bits(rotary, IDS, '16')
    with pytest.raises(TypeError, match=r"lengths must be a non-empty sequence of positive ints, got \[\]"):
        length_bits(rotary, IDS, [])
    with pytest.raises(ValueError, match=r"lengths must be a positive int, got 0"): length_bits(rotary, IDS, [16, 0])
    with pytest.raises(ValueError, match=r"tokens_per_batch must be a positive int, got 0"):
        length_bits(rotary, IDS, [16], tokens_per_batch=0)
    with pytest.raises(ValueError, match=r"ids must be a 1-D Tensor longer than the longest length 16, got \(1, 129\)"):
        length_bits(rotary, IDS[None], [16])
    with pytest.raises(ValueError, match=r"length must be a positive int, got -1"): position_bits(rotary, IDS, -1)
    with pytest.raises(ValueError, match=r"ids must be a 1-D Tensor longer than length=16, got list"):
        position_bits(rotary, [1, 2], 16)
    with pytest.raises(ValueError, match=r"model must be a PosTransformerLM with 'additive' attention, got 'rotary'"):
        resampled(rotary, 32)
    with pytest.raises(ValueError, match=r"new_len must be a positive int, got 0"): resampled(additive, 0)
    with pytest.raises(ValueError, match=r"model must be a PosTransformerLM with 'rotary' attention, got 'Linear'"):
        rescaled(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"factor"):
        rescaled(rotary, dict(rope_type='linear', factor=-1.0))
    with pytest.raises(ValueError, match=r"rope_type must be one of 'linear', 'dynamic', 'yarn', 'llama3', got 'ntk'"):
        scaling_for('ntk', 32, 16)
    with pytest.raises(ValueError, match=r"context must be a positive int, got 0"): scaling_for('linear', 32, 0)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"): length_schemes(0)
    with pytest.raises(TypeError, match=r"factors must be a non-empty sequence of positive ints, got 8"):
        length_study(IDS, IDS, V, factors=8)
    with pytest.raises(ValueError, match=r"factors must be a positive int, got 0"): length_study(IDS, IDS, V, factors=[1, 0])
    with pytest.raises(ValueError, match=r"bucket must be a positive int, got 0"):
        plot_position_bits({'a': torch.rand(8)}, 4, bucket=0)
    assert plot_length_bits({'a': {16: 1.0, 32: math.nan}}, 16).axes[0].get_xlabel() == 'evaluation length (characters)'
