"""The relative and rotary plots of `additive_pos_attn.viz` against the layers they describe: every plotted bias is
what `AdditiveRelMultiheadAttention` adds, for every table shape, clipping and choice of heads, read through the
layer's own attention weights; every rotary curve is the score `RoPEMultiheadAttention` computes, for random head
sizes, bases, bands, distances and both pairings. The chapter keeps one of each as an example."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.rotary import RoPEMultiheadAttention
from additive_pos_attn.viz import plot_relative_bias, plot_rotary_decay, rotary_score_decay
from strategies import SETTINGS
from cases import DTYPE



def _plotted(fig) -> dict:
    "The solid lines of a relative-bias figure by label: `{label: (offsets, values)}`."
    return {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in fig.axes[0].lines if line.get_linestyle() == '-'}


def _weights_of_bias(layer, q_positions, k_positions):
    "The layer's attention weights `(H, T_q, T_k)` with zero in-projections: the softmax of its bias alone."
    with torch.no_grad(): layer.attn.in_proj_weight.zero_(); layer.attn.in_proj_bias.zero_()
    x, kv = torch.randn(1, len(q_positions), layer.embed_dim, dtype=DTYPE), torch.randn(1, len(k_positions), layer.embed_dim, dtype=DTYPE)
    return layer(x, kv, kv, q_positions=q_positions, k_positions=k_positions, need_weights=True, average_attn_weights=False)[1][0]


@pytest.mark.parametrize('max_distance, buckets', [(1, None), (2, None), (7, None), (3, dict(num_buckets=4)),
                                                    (7, dict(num_buckets=4, bidirectional=False))],
                         ids=['clipped-1', 'clipped-2', 'clipped-7', 't5', 't5-causal'])
@pytest.mark.parametrize('per_head', [True, False])
def test_plotted_bias_is_the_bias_the_layer_adds(per_head, max_distance, buckets):
    "Clipped or in T5's buckets, the figure shows the bias of each offset from -m to m, which longer offsets take."
    torch.manual_seed(max_distance)
    layer = AdditiveRelMultiheadAttention(8, 2, max_distance=max_distance, per_head=per_head, dtype=DTYPE,
                                          **(buckets or {}))
    with torch.no_grad(): layer.rel_bias.normal_()
    lines = _plotted(plot_relative_bias(layer))
    labels = ['head 0', 'head 1'] if per_head else ['all heads']
    assert list(lines) == labels
    m = max_distance
    q_positions, k_positions = torch.tensor([-5, 0, 3, 40]), torch.arange(-10, 12)
    weights = _weights_of_bias(layer, q_positions, k_positions)
    for h in range(2):
        offsets, values = lines[labels[h if per_head else 0]]
        assert offsets.tolist() == list(range(-m, m + 1))
        bias = torch.tensor([[values[min(m, max(-m, p - k)) + m] for k in k_positions.tolist()] for p in q_positions.tolist()], dtype=DTYPE)
        torch.testing.assert_close(weights[h], bias.softmax(-1), rtol=0, atol=1e-6)  # the figure's values are float32


@pytest.mark.parametrize('heads', [[0], [2, 1], [3, 0, 2]])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, DTYPE])
def test_chosen_heads_in_order_from_a_table_of_any_float_dtype(heads, dtype):
    table = torch.randn(9, 4).to(dtype)
    fig = plot_relative_bias(table, heads=heads)
    lines = _plotted(fig)
    assert list(lines) == [f'head {h}' for h in heads]
    for h in heads: assert lines[f'head {h}'][1].tolist() == table[:, h].float().tolist()
    assert fig.axes[0].get_legend().get_texts()[-1].get_text() == 'clipping at ±4'


@pytest.mark.parametrize('source, error, message', [
    (torch.zeros(3, 2, 2), TypeError, r"expected a layer with a rel_bias .* got Tensor"),
    ([0.0, 1.0, 2.0], TypeError, r"got list"),
    (torch.zeros(6), ValueError, r"an odd number; got 6"),
])
def test_what_is_not_a_relative_table_is_refused(source, error, message):
    with pytest.raises(error, match=message): plot_relative_bias(source)


@pytest.mark.parametrize('heads', [[-1], [2], [0.0]])
def test_heads_outside_the_table_are_refused(heads):
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 2\)"): plot_relative_bias(torch.zeros(5, 2), heads=heads)


@settings(max_examples=25, **SETTINGS)
@given(pairs=st.integers(1, 24), rope_base=st.floats(2.0, 1e6), interleaved=st.booleans(), data=st.data())
def test_rotary_curve_is_the_layers_score(pairs, rope_base, interleaved, data):
    head_dim = 2 * pairs
    bands = data.draw(st.integers(1, pairs), label='bands')
    q_position = data.draw(st.integers(0, 5000), label='query position')
    decay = rotary_score_decay(head_dim, rope_base, max_distance=q_position + 1, bands=bands)
    assert decay.total[0] == head_dim and [len(band) for band in decay.bands] == [len(g) for g in torch.arange(pairs).tensor_split(bands)]
    torch.testing.assert_close(decay.per_band.sum(0), decay.total, rtol=0, atol=1e-10)
    layer = RoPEMultiheadAttention(head_dim, 1, rope_base=rope_base, interleaved=interleaved, dtype=DTYPE)
    with torch.no_grad():
        layer.attn.in_proj_weight.zero_(); layer.attn.in_proj_bias.zero_()
        layer.attn.in_proj_bias[:2 * head_dim] = 1.0  # every query and key all ones
    k_positions = torch.tensor([q_position, q_position - 1, 0, -1])  # distances 0, 1, q_position, q_position + 1
    query, keys = torch.zeros(1, 1, head_dim, dtype=DTYPE), torch.zeros(1, 4, head_dim, dtype=DTYPE)
    _, weights = layer(query, keys, keys, q_positions=torch.tensor([q_position]), k_positions=k_positions, need_weights=True)
    scores = decay.total[q_position - k_positions] / head_dim ** 0.5
    torch.testing.assert_close(weights[0, 0], scores.softmax(-1), rtol=0, atol=1e-10)


def test_rotary_plot_reads_a_layer_and_refuses_what_it_cannot_use():
    layer = RoPEMultiheadAttention(48, 2, rope_base=123.0)
    assert plot_rotary_decay(layer, max_distance=10).axes[0].lines[0].get_ydata().tolist() == rotary_score_decay(24, 123.0, max_distance=10).total.tolist()
    assert plot_rotary_decay(8, log_distance=True).axes[0].get_xscale() == 'symlog'
    with pytest.raises(TypeError, match="head_dim must be an int or a rotary layer"): plot_rotary_decay(2.0)
    with pytest.raises(TypeError, match="head_dim must be an int, got bool"): rotary_score_decay(True)
    with pytest.raises(ValueError, match="max_distance must be a positive int, got 0"): rotary_score_decay(8, max_distance=0)
    with pytest.raises(ValueError, match="bands must be a positive int, got 0"): rotary_score_decay(8, bands=0)
    with pytest.raises(TypeError, match="rope_base must be a float, got str"): rotary_score_decay(8, '10000')
