"""Fixed cases shared by the layers' exhaustive tests: every kind of attention mask torch accepts, and every form
of positions and position masks for a stream."""
import torch

DTYPE = torch.float64


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
