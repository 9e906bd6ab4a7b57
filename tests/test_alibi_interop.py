"""ALiBi against Hugging Face's BLOOM, where `transformers` is installed: the slopes of `build_alibi_tensor` for 1 to 32
heads, its bias (a per-key term that equals ours under a causal mask, up to a constant per query row, which softmax
ignores) and `BloomAttention` holding the same weights, in float32 to 1e-5, on a left-padded batch."""
import pytest
import torch

transformers = pytest.importorskip('transformers', reason='needs Hugging Face transformers, the interop extra: '
                                   'pip install -e ".[interop]"')
from transformers.models.bloom.configuration_bloom import BloomConfig  # noqa: E402
from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor  # noqa: E402

from additive_pos_attn.alibi import ALiBiMultiheadAttention, alibi_slopes  # noqa: E402
from additive_pos_attn.positions import causal_mask, padded_positions  # noqa: E402
from cases import randomise  # noqa: E402


def _bloom_slopes(num_heads: int) -> torch.Tensor:
    "BLOOM's slopes: its bias of the key at position 1 (two tokens, no padding), one per head."
    return build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]


@pytest.mark.parametrize('H', list(range(1, 17)) + [20, 24, 32])
def test_slopes_are_blooms(H):
    "BLOOM computes its slopes with float32 powers: equal to 1e-6, relative."
    torch.testing.assert_close(alibi_slopes(H), _bloom_slopes(H), rtol=1e-6, atol=0)


@pytest.mark.parametrize('H', [4, 6])
def test_the_bias_is_blooms_up_to_a_constant_per_query(H):
    """Under a causal mask, BLOOM's `m_h p_j` and our `-m_h |p_i - p_j|` differ by `m_h p_i`, the same for every key a
    query sees; left padding: BLOOM counts real tokens, as `padded_positions` does."""
    kpm = torch.arange(7) < torch.tensor([0, 3])[:, None]
    positions, position_mask = padded_positions(kpm)
    ours = ALiBiMultiheadAttention(8 * H, H).pair_bias(positions, positions, position_mask, position_mask, q_len=7, k_len=7)
    bloom = build_alibi_tensor((~kpm).long(), H, torch.float32).view(2, H, 1, 7)
    seen = ~causal_mask(7, 7) & ~kpm[:, None, None, :] & ~kpm[:, None, :, None]  # real queries, the real keys they see
    shift = (bloom - ours).masked_fill(~seen, float('nan'))
    row = shift.nanmean(-1, keepdim=True)
    torch.testing.assert_close(shift[seen.expand_as(shift)], row.expand_as(shift)[seen.expand_as(shift)], rtol=0, atol=1e-5)
    torch.testing.assert_close(row[..., 0], alibi_slopes(H)[:, None] * positions[:, None].float()
                               .masked_fill(kpm[:, None], float('nan')), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize('H', [4, 6])
def test_the_layer_is_bloom_attention(H):
    "The same weights in BLOOM's layout ((H, 3, d) rows of the fused projection): the same outputs on every real token."
    D, B, T = 8 * H, 2, 9
    torch.manual_seed(0)
    layer = randomise(ALiBiMultiheadAttention(D, H)).eval()
    bloom = BloomAttention(BloomConfig(hidden_size=D, n_head=H, attention_dropout=0.0, hidden_dropout=0.0), layer_idx=0).eval()
    d = D // H
    with torch.no_grad():
        weight = torch.stack(layer.attn.in_proj_weight.view(3, H, d, D).unbind(0), dim=1)  # (H, 3, d, D)
        bias = torch.stack(layer.attn.in_proj_bias.view(3, H, d).unbind(0), dim=1)
        bloom.query_key_value.weight.copy_(weight.reshape(3 * D, D)); bloom.query_key_value.bias.copy_(bias.reshape(3 * D))
        bloom.dense.load_state_dict(layer.attn.out_proj.state_dict())
    x = torch.randn(B, T, D)
    kpm = torch.arange(T) < torch.tensor([0, 4])[:, None]
    positions, position_mask = padded_positions(kpm)
    ours = layer(x, x, x, is_causal=True, key_padding_mask=kpm, q_positions=positions, k_positions=positions,
                 q_position_mask=position_mask, k_position_mask=position_mask)[0]
    blocked = causal_mask(T, T)[None, None] | kpm[:, None, None, :]
    mask = torch.zeros(B, 1, T, T).masked_fill(blocked, torch.finfo(torch.float32).min)
    with torch.no_grad():
        theirs = bloom(x, torch.zeros_like(x), build_alibi_tensor((~kpm).long(), H, torch.float32), mask)[0]
    torch.testing.assert_close(ours[~kpm], theirs[~kpm], rtol=0, atol=1e-5)
    print(f'H={H}: largest |ours - BLOOM|: {(ours - theirs)[~kpm].abs().max().item():.1e}')
