"""Fixed cases shared by the layers' exhaustive tests: every kind of attention mask torch accepts, every form of
positions and position masks for a stream, and the check that a layer with no positional signal is its own `attn`."""
import torch

from additive_pos_attn.lm import PosTransformerLM
from additive_pos_attn.positions import causal_mask

DTYPE = torch.float64  # every exact test computes in float64


def close(actual, expected, eps=1e-12):
    "Equal to `eps` (absolute; 1e-12 by default): what two honest float64 computations of one value agree to."
    torch.testing.assert_close(actual, expected, rtol=0, atol=eps)


def randomise(module, *, positional: bool = True):
    """`module` with every parameter moved off its initial value by 0.3·N(0, 1) (biases, bias_k, layer norms included),
    as after training; its positional parameters (`pos_emb`, `rel_bias`) drawn from N(0, 1), or zero. ALiBi's slopes, a
    buffer that nothing trains, keep their values. In place; returned."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit('.', 1)[-1] in ('pos_emb', 'rel_bias'): p.normal_() if positional else p.zero_()
            else: p.add_(torch.randn_like(p) * 0.3)
    return module


def mask_kinds(B, H, Tq, Tk, device):
    "Every kind of attention mask torch accepts, for a (B, Tq, Tk) attention."
    g = torch.Generator().manual_seed(0)
    bool_attn = torch.rand(Tq, Tk, generator=g) < 0.3
    bool_attn[:, 0] = False  # no fully masked row
    kpm = torch.zeros(B, Tk, dtype=torch.bool); kpm[0, -2:] = True
    return {'none': {}, 'bool attn_mask': dict(attn_mask=bool_attn.to(device)),
            'float attn_mask': dict(attn_mask=torch.randn(Tq, Tk, generator=g, dtype=DTYPE).to(device)),
            '3-D attn_mask': dict(attn_mask=torch.randn(B * H, Tq, Tk, generator=g, dtype=DTYPE).to(device)),
            'key_padding_mask': dict(key_padding_mask=kpm.to(device)),
            'float key_padding_mask': dict(key_padding_mask=torch.zeros(B, Tk, dtype=DTYPE).masked_fill(kpm, float('-inf')).to(device)),
            'both': dict(attn_mask=bool_attn.to(device), key_padding_mask=kpm.to(device))}


def position_kinds(B, T, max_len, device, offset=0):
    "Every form of positions (in `[offset, offset + max_len)`) and position masks for one stream, as keyword suffixes."
    shared, per_sample = torch.randperm(max_len)[:T] + offset, torch.randint(0, max_len, (B, T)) + offset
    m1, m2 = torch.rand(T) < 0.5, torch.rand(B, T) < 0.5
    kinds = [dict(), dict(positions=shared), dict(positions=per_sample), dict(position_mask=m1), dict(position_mask=m2),
             dict(positions=shared, position_mask=m1), dict(positions=per_sample, position_mask=m2), dict(positions=shared.int())]
    return [{k: v.to(device) for k, v in kind.items()} for kind in kinds]


def stream(prefix, kind): return {f'{prefix}_{name}': value for name, value in kind.items()}


def check_is_its_attn(layer, device):
    """A layer whose positions add nothing (a zero table) gives what its own `attn` gives, in float64 to 1e-12: every
    mask, with and without weights, self- and cross-attention, and `is_causal` as the mask it stands for."""
    x, mem = torch.randn(3, 6, 16, dtype=DTYPE, device=device), torch.randn(3, 9, 16, dtype=DTYPE, device=device)
    for kv in (x, mem):
        for kw in mask_kinds(3, layer.num_heads, 6, kv.shape[1], device).values():
            for need_weights, average in ((False, True), (True, True), (True, False)):
                out, w = layer(x, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
                ref, ref_w = layer.attn(x, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
                close(out, ref)
                if need_weights: close(w, ref_w)
                else: assert w is None
        out, w = layer(x, kv, kv, is_causal=True, need_weights=True)
        close(out, layer.attn(x, kv, kv, attn_mask=causal_mask(6, kv.shape[1], device))[0])
        assert w[:, 0, 1:].abs().max() == 0


LM_SIZES = (23, 16, 4, 16)  # the test language models' vocabulary, width, heads and longest sequence


def lm(kind='additive', seed=0, device=None, num_layers=2, **kwargs):
    "A seeded float64 model of `kind` in evaluation mode, every parameter moved off its initial value (`randomise`)."
    torch.manual_seed(seed)
    V, D, H, MAX_LEN = LM_SIZES
    model = PosTransformerLM(V, D, H, num_layers, attention=kind, max_len=MAX_LEN, dtype=DTYPE, device=device, **kwargs)
    return randomise(model).eval()


def left_padded(lengths, T, device=None, seed=0):
    "Tokens `(B, T)` of prompts of `lengths` left-padded (padding token 0) and their padding mask."
    g = torch.Generator().manual_seed(seed)
    padding = torch.arange(T) < T - torch.tensor(lengths)[:, None]
    tokens = torch.randint(1, LM_SIZES[0], (len(lengths), T), generator=g).masked_fill(padding, 0)
    return tokens.to(device), padding.to(device)


# T5's bucket options, (max_distance, num_buckets, bidirectional): T5's own (32 buckets up to 128, each direction),
# odd counts, the smallest sizes, and counts whose float64 arithmetic would put some offset in another bucket than
# float32's (18 and 9 at 128)
T5_OPTIONS = [(128, 32, True), (128, 32, False), (128, 18, True), (128, 9, False), (16, 38, True), (32, 36, False),
              (3, 4, True), (2, 2, False), (5, 5, True), (9, 33, True), (1000, 64, True), (200, 7, False),
              (17, 32, True)]
