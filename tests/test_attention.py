"""The attention core against `nn.MultiheadAttention` and against scores written out by hand, on every device: every
kind of mask, shared and distinct updates, biases, dropout, a logit bias; and every reason `choose_path` gives."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from additive_pos_attn.attention import (attend, attend_with_weights, choose_path, fused_attention, module_attention,
                                         project_heads, sdpa_mask)
from additive_pos_attn.positions import causal_mask
from cases import DTYPE, close




def _mask_kinds(attn, B, Tq, Tk, device):
    "Every kind of mask torch accepts (as `nn.MultiheadAttention` is given it, and as the core is given it)."
    kpm = torch.zeros(B, Tk, dtype=torch.bool, device=device); kpm[0, -1] = True
    return [{}, dict(attn_mask=torch.rand(Tq, Tk, device=device) < 0.3),
            dict(attn_mask=torch.randn(B * attn.num_heads, Tq, Tk, device=device, dtype=DTYPE)),
            dict(key_padding_mask=kpm), dict(is_causal=True), dict(is_causal=True, key_padding_mask=kpm),
            dict(attn_mask=torch.randn(Tq, Tk, device=device, dtype=DTYPE), key_padding_mask=kpm.to(DTYPE) * -1e4)]


@pytest.mark.parametrize('bias, dropout, train', [(True, 0.0, False), (False, 0.0, False), (True, 0.5, True)])
def test_fused_attention_is_the_wrapped_module(device, bias, dropout, train):
    "Self- and cross-attention, shared and distinct updates, every mask; with dropout the same seed drops the same weights."
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, bias=bias, dropout=dropout, batch_first=True, dtype=DTYPE, device=device).train(train)
    if bias:
        with torch.no_grad(): attn.in_proj_bias.normal_(); attn.out_proj.bias.normal_()
    x, mem = torch.randn(3, 6, 16, dtype=DTYPE, device=device), torch.randn(3, 9, 16, dtype=DTYPE, device=device)
    B, Tq, _ = x.shape
    for key, u_q, u_k in ((x, x[0] * 0.5, None), (x, torch.randn_like(x), torch.randn_like(x)), (mem, x[0], mem[1]), (x, None, None)):
        u_k = u_q if u_k is None else u_k
        value = x if key is x else torch.randn_like(key)
        shift = lambda t, u: t if u is None else t + u
        for kw in _mask_kinds(attn, B, Tq, key.shape[1], device):
            ref_kw = {**kw, 'attn_mask': causal_mask(Tq, key.shape[1], device)} if kw.get('is_causal') and 'attn_mask' not in kw else kw
            torch.manual_seed(1); ref = attn(shift(x, u_q), shift(key, u_k), value, need_weights=False, **ref_kw)[0]
            torch.manual_seed(1); out = fused_attention(attn, x, key, value, u_q, u_k, **kw)
            close(out, ref)


def test_project_heads_without_bias(device):
    attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, dtype=DTYPE, device=device)
    x = torch.randn(2, 5, 8, dtype=DTYPE, device=device)
    W = attn.in_proj_weight.chunk(3)
    for head, w in zip(project_heads(attn, x, x, x), W): close(head, (x @ w.T).view(2, 5, 2, 4).transpose(1, 2))


def test_sdpa_mask_merges_as_torch_does():
    kpm = torch.tensor([[False, False, True], [False, False, False]])
    kw = dict(batch=2, num_heads=4, q_len=2, k_len=3, dtype=torch.float32)
    assert sdpa_mask(torch.ones(2, 3, dtype=torch.bool), None, True, **kw) == (None, True)  # is_causal is a hint: the flag wins
    mask, causal = sdpa_mask(None, kpm, True, **kw)
    assert torch.equal(mask[1, 0].isinf(), causal_mask(2, 3)) and torch.equal(mask[0, 0].isinf(), causal_mask(2, 3) | kpm[0]) and not causal
    assert sdpa_mask(torch.randn(8, 2, 3), kpm, False, **kw)[0].shape == (2, 4, 2, 3)
    assert sdpa_mask(torch.randn(2, 3), None, False, **kw)[0].shape == (1, 1, 2, 3)
    bias = torch.randn(2, 4, 2, 3)
    mask, causal = sdpa_mask(None, kpm, False, logit_bias=bias, **kw)
    assert torch.equal(mask, bias + torch.zeros(2, 3).masked_fill(kpm, float('-inf'))[:, None, None]) and not causal
    mask, _ = sdpa_mask(torch.randn(2, 3), None, True, logit_bias=bias[0], **kw)  # a given mask with the hint: the mask
    assert mask.shape == (1, 4, 2, 3) and not mask.isinf().any()


@pytest.mark.parametrize('bias_shape', ['shared', 'per-sample'])
def test_attend_adds_the_logit_bias(device, bias_shape):
    "Scores written out by hand: softmax(q kᵀ/√d + bias + masks) v, then the output projection."
    torch.manual_seed(0)
    B, H, Tq, Tk, d = 2, 4, 3, 5, 2
    attn = nn.MultiheadAttention(H * d, H, batch_first=True, dtype=DTYPE, device=device)
    q, k, v = torch.randn(B, H, Tq, d, dtype=DTYPE, device=device), *(torch.randn(B, H, Tk, d, dtype=DTYPE, device=device) for _ in range(2))
    bias = torch.randn(*((H,) if bias_shape == 'shared' else (B, H)), Tq, Tk, dtype=DTYPE, device=device)
    kpm = torch.zeros(B, Tk, dtype=torch.bool, device=device); kpm[1, -2:] = True
    for kw, blocked in ((dict(), torch.zeros(B, 1, Tq, Tk, dtype=torch.bool, device=device)),
                        (dict(key_padding_mask=kpm), kpm[:, None, None, :].expand(B, 1, Tq, Tk)),
                        (dict(is_causal=True), causal_mask(Tq, Tk, device).expand(B, 1, Tq, Tk))):
        scores = (q @ k.transpose(-1, -2) / d ** 0.5 + bias).masked_fill(blocked, float('-inf'))
        expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, H * d))
        close(attend(attn, q, k, v, mask_dtype=DTYPE, logit_bias=bias, **kw), expected)


def test_module_attention_builds_the_causal_mask_of_the_padding_masks_kind(device):
    attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=DTYPE, device=device)
    x = torch.randn(2, 4, 8, dtype=DTYPE, device=device)
    kpm = torch.zeros(2, 4, dtype=DTYPE, device=device); kpm[1, -1] = float('-inf')
    out, weights = module_attention(attn, x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=True)
    float_causal = torch.zeros(4, 4, dtype=DTYPE, device=device).masked_fill(causal_mask(4, 4, device), float('-inf'))
    ref, ref_weights = attn(x, x, x, attn_mask=float_causal, key_padding_mask=kpm)
    close(out, ref); close(weights, ref_weights)


class _Subclassed(nn.MultiheadAttention):
    def forward(self, *args, **kwargs): return super().forward(*args, **kwargs)


def _with_instance_forward():
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    attn.forward = attn.forward
    return attn


@pytest.mark.parametrize('make, reason', [
    (lambda: nn.MultiheadAttention(8, 2, batch_first=True), 'no weights asked for'),
    (lambda: nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=6, add_bias_kv=True, add_zero_attn=True), 'no weights asked for'),
    (lambda: _Subclassed(8, 2, batch_first=True), 'attn has a forward of its own'),
    (_with_instance_forward, 'attn has a forward of its own'),
    (lambda: nn.MultiheadAttention(8, 2), 'attn is not batch first')])
def test_choose_path_names_each_reason(make, reason):
    path = choose_path(make(), need_weights=False)
    assert reason in path.reason and path.name == ('fused' if reason == 'no weights asked for' else 'module'), path


@pytest.mark.parametrize('options', [dict(kdim=5, vdim=7), dict(vdim=7), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                     dict(kdim=5, vdim=7, add_bias_kv=True, add_zero_attn=True, bias=False)],
                         ids=['kdim vdim', 'vdim', 'add_bias_kv', 'add_zero_attn', 'all, no bias'])
def test_fused_attention_takes_every_option_of_the_module(device, options):
    """Separate weights, key and value biases and a zero key: the direct computation gives the module's output and, with
    `attend_heads`, its weights, under every mask and with a logit bias (padded with zeros for the extra keys)."""
    from additive_pos_attn.attention import attend_heads
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True, dtype=DTYPE, device=device, **options)
    with torch.no_grad():
        for p in attn.parameters(): p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 6, 16, dtype=DTYPE, device=device)
    key = torch.randn(3, 9, options.get('kdim', 16), dtype=DTYPE, device=device)
    value = torch.randn(3, 9, options.get('vdim', 16), dtype=DTYPE, device=device)
    for kw in _mask_kinds(attn, 3, 6, 9, device):
        ref_kw = {**kw, 'attn_mask': causal_mask(6, 9, device)} if kw.get('is_causal') and 'attn_mask' not in kw else kw
        ref, ref_weights = attn(x, key, value, average_attn_weights=False, **{k: v for k, v in ref_kw.items() if k != 'is_causal'})
        close(fused_attention(attn, x, key, value, **kw), ref)
        out, weights = attend_heads(attn, *project_heads(attn, x, key, value), mask_dtype=DTYPE, need_weights=True,
                                    average_attn_weights=False, **kw)
        close(out, ref); close(weights, ref_weights)
    bias = torch.randn(4, 6, 9, dtype=DTYPE, device=device)
    ref = attn(x, key, value, attn_mask=bias.repeat(3, 1, 1), need_weights=False)[0]
    close(fused_attention(attn, x, key, value, logit_bias=bias), ref)


@pytest.mark.parametrize('register', ['register_forward_hook', 'register_forward_pre_hook', 'register_full_backward_hook',
                                      'register_full_backward_pre_hook', 'register_module_forward_hook',
                                      'register_module_forward_pre_hook', 'register_module_full_backward_hook'])
def test_choose_path_sees_every_hook(register):
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    owner = attn if hasattr(attn, register) else nn.modules.module
    handle = getattr(owner, register)(lambda *args: None)
    try: assert choose_path(attn, need_weights=False).name == 'module'
    finally: handle.remove()
    assert choose_path(attn, need_weights=False).name == 'fused'


def test_logit_bias_is_checked():
    kw = dict(batch=2, num_heads=4, q_len=2, k_len=3, dtype=torch.float32)
    cases = [(TypeError, r"logit_bias must be a float Tensor of the query's dtype torch.float32, got torch.bool", torch.ones(4, 2, 3, dtype=torch.bool)),
             (TypeError, r"logit_bias must be a float Tensor of the query's dtype torch.float32, got torch.float64", torch.ones(4, 2, 3, dtype=DTYPE)),
             (TypeError, r"logit_bias must be a float Tensor .*, got list", [[0.0]]),
             (ValueError, r"logit_bias must have shape \(4, 2, 3\) or \(2, 4, 2, 3\), got \(2, 3\)", torch.ones(2, 3)),
             (ValueError, r"logit_bias must have shape .*, got \(1, 4, 2, 3\)", torch.ones(1, 4, 2, 3))]
    for error, message, bias in cases:
        with pytest.raises(error, match=message): sdpa_mask(None, None, False, logit_bias=bias, **kw)


@pytest.mark.parametrize('bias_shape', ['shared', 'per-sample'])
def test_module_attention_carries_the_logit_bias(device, bias_shape):
    "The plain path with a logit bias (as a float attn_mask) is the direct path with it, under every kind of mask; dropout draws alike."
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True, dtype=DTYPE, device=device)
    with torch.no_grad(): attn.in_proj_bias.normal_(); attn.out_proj.bias.normal_()
    x, mem = torch.randn(3, 6, 16, dtype=DTYPE, device=device), torch.randn(3, 9, 16, dtype=DTYPE, device=device)
    for train in (False, True):
        attn.train(train)
        for key in (x, mem):
            Tk = key.shape[1]
            bias = torch.randn(*((4,) if bias_shape == 'shared' else (3, 4)), 6, Tk, dtype=DTYPE, device=device)
            for kw in _mask_kinds(attn, 3, 6, Tk, device):
                torch.manual_seed(1); out = module_attention(attn, x, key, key, logit_bias=bias, **kw)[0]
                torch.manual_seed(1); close(out, fused_attention(attn, x, key, key, logit_bias=bias, **kw))


@pytest.mark.parametrize('train', [False, True])
def test_attend_with_weights_is_the_wrapped_module(device, train):
    "Outputs and weights (averaged and per head) as `attn` gives them, under every mask, with a logit bias too; dropout alike."
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True, dtype=DTYPE, device=device).train(train)
    with torch.no_grad(): attn.in_proj_bias.normal_(); attn.out_proj.bias.normal_()
    x, mem = torch.randn(3, 6, 16, dtype=DTYPE, device=device), torch.randn(3, 9, 16, dtype=DTYPE, device=device)
    for key in (x, mem):
        Tk = key.shape[1]
        for bias in (None, torch.randn(4, 6, Tk, dtype=DTYPE, device=device)):
            for kw in _mask_kinds(attn, 3, 6, Tk, device):
                for average in (True, False):
                    heads = project_heads(attn, x, key, key)
                    torch.manual_seed(1)
                    out, weights = attend_with_weights(attn, *heads, mask_dtype=DTYPE, logit_bias=bias, average_attn_weights=average, **kw)
                    torch.manual_seed(1)
                    ref, ref_weights = module_attention(attn, x, key, key, need_weights=True, average_attn_weights=average, logit_bias=bias, **kw)
                    close(out, ref); close(weights, ref_weights)
