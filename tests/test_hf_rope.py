"""The rotary layer's context extension (`rope_scaling`) and partial rotary (`rotary_dim`) against Hugging Face:
the frequencies and attention factor of `ROPE_INIT_FUNCTIONS` (to 1e-6), `LlamaAttention` given the same weights
(to 1e-5 in float32, 'dynamic' past the original length included), and GPT-NeoX's partial rotary attention."""
import pytest
import torch

transformers = pytest.importorskip(
    'transformers', reason='Hugging Face parity needs transformers, the interop extra: pip install -e ".[interop]"')
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import (GPTNeoXAttention, GPTNeoXConfig,  # noqa: E402
                                                            GPTNeoXRotaryEmbedding)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding  # noqa: E402

from additive_pos_attn.positions import causal_mask  # noqa: E402
from additive_pos_attn.rotary import RoPEMultiheadAttention, rope_scaled_frequencies  # noqa: E402

D, H, ORIGINAL, BASE = 64, 4, 32, 10000.0
SCALINGS = {
    'linear': dict(rope_type='linear', factor=4.0),
    'dynamic': dict(rope_type='dynamic', factor=4.0, original_max_position_embeddings=ORIGINAL),
    'yarn': dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=ORIGINAL),
    'yarn-options': dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=ORIGINAL, beta_fast=16.0,
                         beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, truncate=False),
    'yarn-factor': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=ORIGINAL,
                        attention_factor=1.5),
    'llama3': dict(rope_type='llama3', factor=8.0, original_max_position_embeddings=ORIGINAL, low_freq_factor=1.0,
                   high_freq_factor=4.0),
}


def hf_parameters(scaling: dict, base: float = BASE, partial: float = 1.0) -> tuple[dict, int]:
    "Hugging Face's `rope_parameters` and `max_position_embeddings` for the layer's `rope_scaling`."
    params = dict(scaling, rope_theta=base)
    if partial != 1.0: params['partial_rotary_factor'] = partial
    original = params.get('original_max_position_embeddings', ORIGINAL)
    if scaling['rope_type'] == 'dynamic':  # Hugging Face's dynamic scaling takes config.max_position_embeddings
        del params['original_max_position_embeddings']
        return params, original
    return params, int(original * params.get('factor', 1.0))


def llama_config(scaling: dict, *, bias: bool = True, base: float = BASE, head_dim: int = D // H) -> LlamaConfig:
    params, max_positions = hf_parameters(scaling, base)
    config = LlamaConfig(hidden_size=H * head_dim, num_attention_heads=H, num_key_value_heads=H, head_dim=head_dim,
                         attention_bias=bias, rope_parameters=params, max_position_embeddings=max_positions,
                         intermediate_size=8, num_hidden_layers=1, vocab_size=8)
    config._attn_implementation = 'eager'
    return config


@pytest.mark.parametrize('name', SCALINGS)
@pytest.mark.parametrize('rotary_dim', [16, 6])
def test_frequencies_are_hugging_faces(name, rotary_dim):
    "θ' and the attention factor of each rope_type equal `ROPE_INIT_FUNCTIONS[rope_type]`'s (dynamic at each length)."
    scaling = SCALINGS[name]
    params, max_positions = hf_parameters(scaling, partial=rotary_dim / 16)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=params,
                         max_position_embeddings=max_positions, num_hidden_layers=1, vocab_size=8)
    for seq_len in ([None, 1, ORIGINAL, ORIGINAL + 1, 5 * ORIGINAL] if name == 'dynamic' else [None]):
        want, want_factor = ROPE_INIT_FUNCTIONS[scaling['rope_type']](config, 'cpu', seq_len=seq_len)
        got, factor = rope_scaled_frequencies(rotary_dim, BASE, scaling, seq_len=seq_len)
        assert got.shape == want.shape == (rotary_dim // 2,)
        assert (got - want.double()).abs().max() <= 1e-6 * want.abs().max(), (name, seq_len)
        assert abs(factor - want_factor) <= 1e-6


def _copy_into_llama(layer: RoPEMultiheadAttention, hf: LlamaAttention):
    q, k, v = layer.attn.in_proj_weight.detach().chunk(3)
    with torch.no_grad():
        for proj, weight in zip((hf.q_proj, hf.k_proj, hf.v_proj), (q, k, v)): proj.weight.copy_(weight)
        hf.o_proj.weight.copy_(layer.attn.out_proj.weight)
        if layer.attn.in_proj_bias is not None:
            for proj, bias in zip((hf.q_proj, hf.k_proj, hf.v_proj), layer.attn.in_proj_bias.detach().chunk(3)):
                proj.bias.copy_(bias)
            hf.o_proj.bias.copy_(layer.attn.out_proj.bias)


def _additive_causal(position_ids: torch.Tensor) -> torch.Tensor:
    "Hugging Face's 4-D additive mask `(B, 1, T, T)`: causal in the token order."
    length = position_ids.shape[-1]
    mask = torch.zeros(length, length).masked_fill(causal_mask(length, length), float('-inf'))
    return mask.expand(position_ids.shape[0], 1, length, length)


def llama_output(config: LlamaConfig, layer: RoPEMultiheadAttention, x: torch.Tensor, position_ids: torch.Tensor):
    "LlamaAttention with the layer's weights, its cos and sin from a fresh LlamaRotaryEmbedding (dynamic is stateful)."
    hf = LlamaAttention(config, layer_idx=0).eval()
    _copy_into_llama(layer, hf)
    cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    return hf(x, position_embeddings=cos_sin, attention_mask=_additive_causal(position_ids))[0]


CALLS = {  # position_ids (B, T) for B = 2: short, past the original length, per sample and shifted
    'short': lambda: torch.arange(20).expand(2, 20),
    'long': lambda: torch.arange(5 * ORIGINAL).expand(2, 5 * ORIGINAL),
    'per-sample': lambda: torch.stack((torch.arange(40) + 3, torch.arange(40) * 3)),
}


@pytest.mark.parametrize('name', [None, *SCALINGS])
@pytest.mark.parametrize('call', CALLS)
@pytest.mark.parametrize('bias', [True, False])
def test_the_half_split_layer_is_llama_attention(name, call, bias):
    "Given the same weights, the layer with interleaved=False computes LlamaAttention's output, for every rope_type."
    torch.manual_seed(0)
    scaling = None if name is None else SCALINGS[name]
    layer = RoPEMultiheadAttention(D, H, interleaved=False, bias=bias, rope_scaling=scaling).eval()
    with torch.no_grad():
        if bias: layer.attn.in_proj_bias.normal_(); layer.attn.out_proj.bias.normal_()
    position_ids = CALLS[call]()
    x = torch.randn(2, position_ids.shape[1], D)
    want = llama_output(llama_config(scaling or {'rope_type': 'default'}, bias=bias), layer, x, position_ids)
    got = layer(x, x, x, q_positions=position_ids, k_positions=position_ids, is_causal=True)[0]
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max().item()


def test_dynamic_follows_the_length_of_each_call():
    "Dynamic frequencies follow each call's length, as a fresh Hugging Face rotary embedding does; below L: plain."
    torch.manual_seed(1)
    scaling = SCALINGS['dynamic']
    layer, plain = (RoPEMultiheadAttention(D, H, interleaved=False, rope_scaling=s).eval() for s in (scaling, None))
    plain.load_state_dict(layer.state_dict())
    config = llama_config(scaling)
    for length in (ORIGINAL - 5, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL, 2 * ORIGINAL):
        x = torch.randn(1, length, D)
        got = layer(x, x, x, is_causal=True)[0]
        assert (got - llama_output(config, layer, x, torch.arange(length)[None])).abs().max() <= 1e-5
        if length <= ORIGINAL: assert torch.equal(got, plain(x, x, x, is_causal=True)[0])


def _copy_into_neox(layer: RoPEMultiheadAttention, hf: GPTNeoXAttention):
    "GPT-NeoX packs each head's query, key and value rows together: `(H, 3, d)` rows where the layer has `(3, H, d)`."
    d = layer.head_dim
    with torch.no_grad():
        hf.query_key_value.weight.copy_(layer.attn.in_proj_weight.unflatten(0, (3, H, d)).transpose(0, 1).flatten(0, 2))
        hf.query_key_value.bias.copy_(layer.attn.in_proj_bias.unflatten(0, (3, H, d)).transpose(0, 1).flatten())
        hf.dense.weight.copy_(layer.attn.out_proj.weight); hf.dense.bias.copy_(layer.attn.out_proj.bias)


@pytest.mark.parametrize('name', [None, 'linear', 'dynamic', 'yarn', 'llama3'])
@pytest.mark.parametrize('rotary_dim', [4, 8])
def test_partial_rotary_is_gpt_neox(name, rotary_dim):
    "rotary_dim turns the first channels of each head as GPT-NeoX's partial_rotary_factor does, with any rope_type."
    torch.manual_seed(2)
    scaling = None if name is None else SCALINGS[name]
    layer = RoPEMultiheadAttention(D, H, interleaved=False, rope_scaling=scaling, rotary_dim=rotary_dim).eval()
    with torch.no_grad(): layer.attn.in_proj_bias.normal_(); layer.attn.out_proj.bias.normal_()
    params, max_positions = hf_parameters(scaling or {'rope_type': 'default'}, partial=rotary_dim / (D // H))
    config = GPTNeoXConfig(hidden_size=D, num_attention_heads=H, rope_parameters=params, attention_bias=True,
                           max_position_embeddings=max_positions, num_hidden_layers=1, vocab_size=8,
                           intermediate_size=8)
    config._attn_implementation = 'eager'
    hf = GPTNeoXAttention(config, layer_idx=0).eval()
    _copy_into_neox(layer, hf)
    position_ids = torch.stack((torch.arange(3 * ORIGINAL), torch.arange(3 * ORIGINAL) + 7))
    x = torch.randn(2, 3 * ORIGINAL, D)
    want = hf(x, attention_mask=_additive_causal(position_ids),
              position_embeddings=GPTNeoXRotaryEmbedding(config)(x, position_ids))[0]
    got = layer(x, x, x, q_positions=position_ids, k_positions=position_ids, is_causal=True)[0]
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max().item()
