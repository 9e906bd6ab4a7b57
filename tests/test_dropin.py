"""The layers as drop-in replacements for `nn.MultiheadAttention` (issue 15), on every device, in float64 to 1e-12.

- Every constructor option of `nn.MultiheadAttention` (``bias``, ``dropout``, ``batch_first``, ``kdim``, ``vdim``,
  ``add_bias_kv``, ``add_zero_attn``): with no positional signal (zero table; rotary, ALiBi: every position mask False) a
  layer computes what `nn.MultiheadAttention` built with the same arguments and weights computes, outputs and weights,
  self- and cross-attention, under every mask, ``is_causal`` as the mask it stands for, and with dropout in training
  mode (the same seed drops the same weights); torch's own hinted call (``attn_mask`` with ``is_causal=True``) gives
  torch's result. Bad values are refused by name; the additive table refuses ``kdim``.
- Unbatched ``(T, D)`` calls, as `nn.MultiheadAttention` takes them, are the batched call on a batch of one.
- `nn.MultiheadAttention`'s attributes are the wrapped ``attn``'s, the same objects, read and assigned.
- No torch container computes attention without calling the layer: `nn.TransformerEncoderLayer` (both norms),
  `nn.TransformerEncoder` (nested tensors on and off), `nn.TransformerDecoderLayer` and `nn.Transformer` around layers
  with non-zero positional parameters give, in evaluation mode without gradients, what they give in training mode
  without dropout, not what they give without positions, and the layers' forward hooks see every call.
- `from_mha` and `convert`: a converted model computes what it computed (additive, relative), holds copies of the
  weights, and learns its table; rotary and ALiBi conversion is exact only where no position acts (ALiBi: or with zero
  slopes)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from additive_pos_attn import AdditivePosMultiheadAttention, AdditiveRelMultiheadAttention, RoPEMultiheadAttention
from additive_pos_attn.alibi import ALiBiMultiheadAttention
from additive_pos_attn.blocks import positional_parameters
from additive_pos_attn.positions import causal_mask
from cases import DTYPE, close, mask_kinds, randomise

LAYERS = {'additive': AdditivePosMultiheadAttention, 'relative': AdditiveRelMultiheadAttention, 'rotary': RoPEMultiheadAttention,
          'alibi': ALiBiMultiheadAttention}
SIZES = {AdditivePosMultiheadAttention: dict(max_len=32), AdditiveRelMultiheadAttention: dict(max_distance=6), RoPEMultiheadAttention: {},
         ALiBiMultiheadAttention: {}}
UNTABLED = (RoPEMultiheadAttention, ALiBiMultiheadAttention)  # positions act at a fresh layer's default positions
KINDS = pytest.mark.parametrize('cls', list(LAYERS.values()), ids=list(LAYERS))
TABLED = pytest.mark.parametrize('cls', [AdditivePosMultiheadAttention, AdditiveRelMultiheadAttention], ids=['additive', 'relative'])
MHA_ATTRIBUTES = ('in_proj_weight', 'in_proj_bias', 'q_proj_weight', 'k_proj_weight', 'v_proj_weight', 'bias_k', 'bias_v',
                  'out_proj', 'add_zero_attn', 'dropout', 'kdim', 'vdim', '_qkv_same_embed_dim')
B, H, D, TQ, TK = 3, 4, 16, 6, 9



def _layer(cls, *args, **kwargs):
    "A layer of `cls` with its size argument (`max_len`, `max_distance`), in float64 unless told."
    return cls(*args, **SIZES[cls], **{'dtype': DTYPE, **kwargs})


def _off(cls, q_len: int, k_len: int, device) -> dict:
    "What switches a layer's positions off: nothing for a zero table, every position mask False for rotary and ALiBi."
    if cls not in UNTABLED: return {}
    return dict(q_position_mask=torch.zeros(q_len, dtype=torch.bool, device=device),
                k_position_mask=torch.zeros(k_len, dtype=torch.bool, device=device))


def _masks(q_len: int, k_len: int, device) -> list:
    "`mask_kinds` (bool and float, 2-D and 3-D attn_mask, bool and float key_padding_mask), a 3-D bool attn_mask, and is_causal (with padding)."
    kinds = list(mask_kinds(B, H, q_len, k_len, device).values())
    bool_3d = torch.rand(B * H, q_len, k_len, device=device) < 0.3
    bool_3d[..., 0] = False
    kpm = kinds[4]['key_padding_mask']
    return kinds + [dict(attn_mask=bool_3d), dict(is_causal=True), dict(is_causal=True, key_padding_mask=kpm)]


def _for_torch(kw: dict, q_len: int, k_len: int, device) -> dict:
    """The masks as `nn.MultiheadAttention` takes them: `is_causal=True` alone stands for the causal mask, which torch
    needs given (its `is_causal` is only a hint about the mask: `test_the_causal_hint_follows_the_mask`)."""
    if not kw.get('is_causal'): return kw
    return {**{k: v for k, v in kw.items() if k != 'is_causal'}, 'attn_mask': causal_mask(q_len, k_len, device)}


def _seeded(fn, *args, **kwargs):
    torch.manual_seed(7)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# 1. nn.MultiheadAttention's constructor

OPTIONS = {'defaults': {}, 'no bias': dict(bias=False), 'add_bias_kv': dict(add_bias_kv=True), 'add_zero_attn': dict(add_zero_attn=True),
           'kdim = embed_dim, vdim': dict(kdim=D, vdim=12), 'kdim vdim': dict(kdim=8, vdim=12),
           'sequence first': dict(batch_first=False, add_bias_kv=True),
           'everything': dict(bias=False, add_bias_kv=True, add_zero_attn=True, vdim=12),
           'everything, kdim': dict(bias=False, add_bias_kv=True, add_zero_attn=True, kdim=8, vdim=12, batch_first=False)}


@KINDS
@pytest.mark.parametrize('options', OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_is_nn_multihead_attention(device, cls, options):
    """Built with the same arguments and holding the same weights, the layer without positions is `nn.MultiheadAttention`:
    outputs and weights (averaged and per head), self- and cross-attention, every mask, in evaluation mode and in
    training mode with dropout (the same seed, the same output)."""
    if cls is AdditivePosMultiheadAttention and options.get('kdim', D) != D: pytest.skip('the additive table refuses kdim != embed_dim (test_bad_options_are_refused_by_name)')
    options = {'batch_first': True, **options}  # torch's default is sequence first; the layers' is batch first
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(D, H, dropout=0.25, **options, dtype=DTYPE, device=device))
    layer = _layer(cls, D, H, dropout=0.25, **options, device=device)
    layer.attn.load_state_dict(mha.state_dict())  # strict: the same parameters, bias_k and apart projections included
    x = torch.randn(B, TQ, D, dtype=DTYPE, device=device)
    key = torch.randn(B, TK, options.get('kdim', D), dtype=DTYPE, device=device)
    value = torch.randn(B, TK, options.get('vdim', D), dtype=DTYPE, device=device)
    pairs = [(key, value)] + ([(x, x)] if 'kdim' not in options and 'vdim' not in options else [])
    as_layout = (lambda t: t) if options['batch_first'] else (lambda t: t.transpose(0, 1))
    for train in (False, True):
        layer.train(train), mha.train(train)
        for k, v in pairs:
            q_in, k_in, v_in = as_layout(x), as_layout(k), as_layout(v)
            if k is x: k_in = v_in = q_in  # self-attention: one tensor
            off = _off(cls, TQ, k.shape[1], device)
            for kw in _masks(TQ, k.shape[1], device):
                for need_weights, average in ((False, True), (True, False)) + (() if train else ((True, True),)):  # the average: once
                    flags = dict(need_weights=need_weights, average_attn_weights=average)
                    out, weights = _seeded(layer, q_in, k_in, v_in, **kw, **flags, **off)
                    ref, ref_weights = _seeded(mha, q_in, k_in, v_in, **_for_torch(kw, TQ, k.shape[1], device), **flags)
                    close(out, ref)
                    if need_weights: close(weights, ref_weights)
                    else: assert weights is None


@KINDS
@pytest.mark.parametrize('extra', ['none', 'add_bias_kv', 'add_zero_attn'])
@pytest.mark.parametrize('need_weights', [False, True], ids=['no weights', 'weights'])
def test_the_causal_hint_follows_the_mask(device, cls, extra, need_weights):
    """torch's own call, `attn_mask=causal_mask` with the hint `is_causal=True`, gives what the mask gives: self- and
    cross-attention, with and without key_padding_mask, in evaluation mode. With add_bias_kv or add_zero_attn torch
    itself answers twice: without weights its causal flag over the extended keys hides the extra keys from every query,
    with weights the padded mask shows them; the layers take the mask's answer both ways (torch's with weights)."""
    options = {} if extra == 'none' else {extra: True}
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(D, H, batch_first=True, **options, dtype=DTYPE, device=device)).eval()
    layer = _layer(cls, D, H, **options, device=device).eval()
    layer.attn.load_state_dict(mha.state_dict())
    x, mem = torch.randn(B, TQ, D, dtype=DTYPE, device=device), torch.randn(B, TK, D, dtype=DTYPE, device=device)
    for k in (x, mem):
        kpm = torch.zeros(B, k.shape[1], dtype=torch.bool, device=device); kpm[0, -2:] = True
        for padding in ({}, dict(key_padding_mask=kpm)):
            kw = dict(attn_mask=causal_mask(TQ, k.shape[1], device), is_causal=True, **padding)
            out, weights = layer(x, k, k, need_weights=need_weights, **kw, **_off(cls, TQ, k.shape[1], device))
            ref, ref_weights = mha(x, k, k, need_weights=True, average_attn_weights=True, **kw)
            close(out, ref)
            if need_weights: close(weights, ref_weights)


@KINDS
@pytest.mark.parametrize('bias_dtype', [torch.float16, torch.float32])
def test_a_projection_bias_of_another_dtype_is_nn_multihead_attentions(device, cls, bias_dtype):
    """An in-projection bias of another dtype than the query (`in_proj_bias.data = ....half()` on a float64 layer) gives
    what `nn.MultiheadAttention` holding the same weights gives: self- and cross-attention, causal or masked, with and
    without weights (both of the layer's paths)."""
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(D, H, batch_first=True, dtype=DTYPE, device=device)).eval()
    layer = _layer(cls, D, H, device=device).eval()
    layer.attn.load_state_dict(mha.state_dict())
    for attn in (mha, layer.attn): attn.in_proj_bias.data = attn.in_proj_bias.data.to(bias_dtype)
    assert layer.attn.in_proj_bias.dtype == bias_dtype
    x, mem = torch.randn(B, TQ, D, dtype=DTYPE, device=device), torch.randn(B, TK, D, dtype=DTYPE, device=device)
    kpm = torch.zeros(B, TK, dtype=torch.bool, device=device); kpm[0, -2:] = True
    for k, kw in ((x, dict(is_causal=True)), (mem, dict(key_padding_mask=kpm))):
        for need_weights in (False, True):
            out, weights = layer(x, k, k, need_weights=need_weights, **kw, **_off(cls, TQ, k.shape[1], device))
            ref, ref_weights = mha(x, k, k, need_weights=need_weights, **_for_torch(kw, TQ, k.shape[1], device))
            assert out.dtype == DTYPE
            close(out, ref)
            if need_weights: close(weights, ref_weights)


@KINDS
def test_bad_options_are_refused_by_name(cls):
    "Each of nn.MultiheadAttention's options is checked by name; the additive table says why it refuses kdim."
    cases = [(TypeError, r"add_bias_kv must be a bool, got int 1", dict(add_bias_kv=1)),
             (TypeError, r"add_zero_attn must be a bool, got NoneType None", dict(add_zero_attn=None)),
             (ValueError, r"kdim must be a positive int, got 0", dict(kdim=0)),
             (TypeError, r"kdim must be an int, got float 8.0", dict(kdim=8.0)),
             (ValueError, r"vdim must be a positive int, got -1", dict(vdim=-1)),
             (TypeError, r"vdim must be an int, got bool True", dict(vdim=True)),
             (TypeError, r"batch_first must be a bool, got int 0", dict(batch_first=0))]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message): _layer(cls, D, H, **kwargs)
    if cls is AdditivePosMultiheadAttention:
        with pytest.raises(ValueError, match=r"kdim must be embed_dim=16 for the additive table, .* got kdim=8 \(vdim may differ\)"):
            _layer(cls, D, H, kdim=8)
        assert _layer(cls, D, H, kdim=D, vdim=12)._qkv_same_embed_dim is False  # vdim may differ
    else:
        layer = _layer(cls, D, H, kdim=8, vdim=12)
        x = torch.randn(2, 5, D, dtype=DTYPE)
        with pytest.raises(ValueError, match=r"key must have last dimension kdim=8, got shape \(2, 5, 16\)"): layer(x, x, x)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Unbatched inputs


UNBATCHED = {'defaults': {}, 'sequence first': dict(batch_first=False), 'extra keys, vdim': dict(add_bias_kv=True, add_zero_attn=True, vdim=12)}


def _unbatched_masks(q_len: int, k_len: int, device) -> list:
    "The masks of an unbatched call: key_padding_mask (T_k,), attn_mask (T_q, T_k) or (H, T_q, T_k), bool and float."
    kpm = torch.zeros(k_len, dtype=torch.bool, device=device); kpm[-2:] = True
    bool_2d = torch.rand(q_len, k_len, device=device) < 0.3; bool_2d[:, 0] = False
    return [{}, dict(key_padding_mask=kpm), dict(key_padding_mask=torch.zeros(k_len, dtype=DTYPE, device=device).masked_fill(kpm, float('-inf'))),
            dict(attn_mask=bool_2d), dict(attn_mask=torch.randn(q_len, k_len, dtype=DTYPE, device=device)),
            dict(attn_mask=torch.randn(H, q_len, k_len, dtype=DTYPE, device=device)), dict(attn_mask=bool_2d, key_padding_mask=kpm),
            dict(is_causal=True)]


def _batch_of_one(kw: dict) -> dict:
    "The keywords of an unbatched call for the batched call on a batch of one."
    out = dict(kw)
    for name in ('key_padding_mask', 'q_positions', 'k_positions', 'q_position_mask', 'k_position_mask'):
        if name in kw: out[name] = kw[name][None]
    return out


@KINDS
@pytest.mark.parametrize('options', UNBATCHED.values(), ids=UNBATCHED.keys())
def test_unbatched_calls_are_nn_multihead_attentions(device, cls, options):
    """`(T, D)` inputs, `(T_k,)` padding, `(T_q, T_k)` or `(H, T_q, T_k)` masks: without positions, what
    nn.MultiheadAttention gives unbatched (output `(T_q, D)`, weights `(T_q, T_k)` or `(H, T_q, T_k)`)."""
    options = {'batch_first': True, **options}
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(D, H, **options, dtype=DTYPE, device=device))
    layer = _layer(cls, D, H, **options, device=device)
    layer.attn.load_state_dict(mha.state_dict())
    x = torch.randn(TQ, D, dtype=DTYPE, device=device)
    mem, value = torch.randn(TK, D, dtype=DTYPE, device=device), torch.randn(TK, options.get('vdim', D), dtype=DTYPE, device=device)
    for k, v in ((x, x if 'vdim' not in options else None), (mem, value)):
        if v is None: continue
        for kw in _unbatched_masks(TQ, k.shape[0], device):
            for need_weights, average in ((False, True), (True, True), (True, False)):
                flags = dict(need_weights=need_weights, average_attn_weights=average)
                out, weights = layer(x, k, v, **kw, **flags, **_off(cls, TQ, k.shape[0], device))
                ref, ref_weights = mha(x, k, v, **_for_torch(kw, TQ, k.shape[0], device), **flags)
                assert out.shape == (TQ, D)
                close(out, ref)
                if need_weights:
                    columns = k.shape[0] + options.get('add_bias_kv', False) + options.get('add_zero_attn', False)  # torch's extra keys
                    assert weights.shape == ((TQ, columns) if average else (H, TQ, columns))
                    close(weights, ref_weights)


@KINDS
@pytest.mark.parametrize('batch_first', [True, False])
def test_unbatched_calls_are_a_batch_of_one(device, cls, batch_first):
    "With positions that matter, `(T,)` positions and position masks: the batched call on a batch of one, squeezed."
    torch.manual_seed(0)
    layer = randomise(_layer(cls, D, H, batch_first=batch_first, device=device))
    batch = (lambda t: t[None]) if batch_first else (lambda t: t[:, None])
    unbatch = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])
    x, mem = torch.randn(TQ, D, dtype=DTYPE, device=device), torch.randn(TK, D, dtype=DTYPE, device=device)
    for k in (x, mem):
        k_len = k.shape[0]
        positions = [{}, dict(q_positions=torch.randperm(20, device=device)[:TQ], k_positions=torch.randperm(20, device=device)[:k_len]),
                     dict(q_position_mask=torch.rand(TQ, device=device) < 0.5, k_position_mask=torch.rand(k_len, device=device) < 0.5)]
        for kw in _unbatched_masks(TQ, k_len, device):
            for pos in positions:
                for average in (True, False):
                    call = dict(kw, **pos, need_weights=True, average_attn_weights=average)
                    out, weights = layer(x, k, k, **call)
                    bk = batch(k)
                    ref, ref_weights = layer(batch(x), *((bk, bk) if k is not x else (batch(x), batch(x))), **_batch_of_one(call))
                    close(out, unbatch(ref)); close(weights, ref_weights[0])
    layer.eval()
    out, weights = layer(x, x, x)  # self-attention, one tensor, no weights
    close(out, unbatch(layer(batch(x), batch(x), batch(x))[0])); assert weights is None


@KINDS
def test_unbatched_calls_are_checked(cls):
    layer = _layer(cls, D, H)
    x = torch.randn(TQ, D, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"query is unbatched \(T, D\), so key must be 2-D too, got \(1, 6, 16\)"): layer(x, x[None], x[None])
    with pytest.raises(ValueError, match=r"query is unbatched \(T, D\), so value must be 2-D too, got list"): layer(x, x, [1.0])


# ---------------------------------------------------------------------------------------------------------------------
# 3. nn.MultiheadAttention's attributes

ATTRIBUTE_OPTIONS = {'packed': dict(batch_first=False), 'apart': dict(vdim=12, add_bias_kv=True, add_zero_attn=True, bias=False, dropout=0.1)}


@KINDS
@pytest.mark.parametrize('options', ATTRIBUTE_OPTIONS.values(), ids=ATTRIBUTE_OPTIONS.keys())
def test_attributes_are_the_wrapped_modules(device, cls, options):
    """Each of nn.MultiheadAttention's attributes is `attn`'s, the same object, with the value torch's module built
    with the same arguments has; `batch_first`, `num_heads`, `head_dim` and `embed_dim` are the layer's own."""
    options = {'batch_first': True, **options}
    layer = _layer(cls, D, H, **options, device=device)
    mha = nn.MultiheadAttention(D, H, **options, dtype=DTYPE, device=device)
    for name in MHA_ATTRIBUTES:
        assert getattr(layer, name) is getattr(layer.attn, name), name
        mine, torchs = getattr(layer, name), getattr(mha, name)
        if isinstance(torchs, torch.Tensor): assert isinstance(mine, nn.Parameter) and mine.shape == torchs.shape, name
        elif isinstance(torchs, nn.Linear): assert type(mine) is type(torchs) and mine.weight.shape == torchs.weight.shape, name
        else: assert mine == torchs and type(mine) is type(torchs), name
    for name in ('batch_first', 'num_heads', 'head_dim', 'embed_dim'):
        assert getattr(layer, name) == getattr(mha, name), name
        assert name in vars(layer), name  # the layer's own, not attn's (attn is always batch first)
    assert layer.attn.batch_first is True
    keys = set(layer.state_dict())
    for name in MHA_ATTRIBUTES:  # each parameter and module assigned anew lands in attn
        value = getattr(layer, name)
        if not isinstance(value, (nn.Parameter, nn.Module)): continue
        new = nn.Parameter(value.detach().clone()) if isinstance(value, nn.Parameter) else copy.deepcopy(value)
        setattr(layer, name, new)
        assert getattr(layer.attn, name) is new and getattr(layer, name) is new, name
    assert set(layer.state_dict()) == keys and not layer._parameters.keys() - positional_parameters(layer).keys()
    if cls is ALiBiMultiheadAttention: assert set(layer._buffers) == {'slopes'}  # its fixed slopes: state, not a parameter


@KINDS
def test_attributes_are_assigned_to_the_wrapped_module(device, cls):
    """Assigning an attribute of nn.MultiheadAttention to the layer assigns it to `attn`: state dict keys stay `attn.*`,
    and the layer computes what nn.MultiheadAttention with the same assignments computes."""
    torch.manual_seed(0)
    layer = _layer(cls, D, H, add_bias_kv=True, device=device)
    mha = nn.MultiheadAttention(D, H, add_bias_kv=True, batch_first=True, dtype=DTYPE, device=device)
    mha.load_state_dict(layer.attn.state_dict())
    keys = set(layer.state_dict())
    new = dict(in_proj_weight=nn.Parameter(torch.randn(3 * D, D, dtype=DTYPE, device=device) * 0.3),
               in_proj_bias=nn.Parameter(torch.randn(3 * D, dtype=DTYPE, device=device)),
               bias_k=nn.Parameter(torch.randn(1, 1, D, dtype=DTYPE, device=device)), bias_v=nn.Parameter(torch.randn(1, 1, D, dtype=DTYPE, device=device)),
               out_proj=nn.modules.linear.NonDynamicallyQuantizableLinear(D, D, dtype=DTYPE, device=device),
               dropout=0.3, add_zero_attn=True)
    for name, value in new.items():
        setattr(layer, name, value)
        setattr(mha, name, copy.deepcopy(value))
        assert getattr(layer.attn, name) is value and getattr(layer, name) is value, name
        assert name not in vars(layer) and name not in layer._parameters and name not in layer._modules, name
    assert set(layer.state_dict()) == keys, set(layer.state_dict()) ^ keys
    assert all(k.startswith('attn.') or k in positional_parameters(layer) or k in layer._buffers for k in keys)
    assert torch.equal(layer.state_dict()['attn.in_proj_weight'], new['in_proj_weight'])
    x, mem = torch.randn(B, TQ, D, dtype=DTYPE, device=device), torch.randn(B, TK, D, dtype=DTYPE, device=device)
    for train in (False, True):
        layer.train(train), mha.train(train)
        for need_weights in (False, True):
            out, weights = _seeded(layer, x, mem, mem, need_weights=need_weights, **_off(cls, TQ, TK, device))
            ref, ref_weights = _seeded(mha, x, mem, mem, need_weights=need_weights)
            close(out, ref)
            if need_weights: close(weights, ref_weights)
    parameters = dict(layer.named_parameters())  # what an optimiser is given: the new parameters
    assert parameters['attn.in_proj_weight'] is new['in_proj_weight'] and parameters['attn.out_proj.weight'] is new['out_proj'].weight


# ---------------------------------------------------------------------------------------------------------------------
# 4. No torch container computes attention without calling the layer


def _replace_attention(module: nn.Module, make) -> list:
    "Replace every nn.MultiheadAttention in `module` by `make(mha)`, by hand (not `convert`); the new layers, in order."
    made = []
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, make(child)); made.append(getattr(module, name))
        else: made += _replace_attention(child, make)
    return made


def _positional_twin(cls, module: nn.Module, *, positional: bool) -> tuple:
    "A copy of `module` whose attentions are layers of `cls` holding their weights, positional parameters N(0, 1) or zero; the layers."
    def make(mha):
        layer = _layer(cls, mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first,
                       device=mha.out_proj.weight.device)
        layer.attn.load_state_dict(mha.state_dict())
        return layer
    twin = copy.deepcopy(module)
    with torch.no_grad():
        layers = _replace_attention(twin, make)
        for layer in layers:
            for p in positional_parameters(layer).values(): p.normal_() if positional else p.zero_()
    return twin, layers


def _count_calls(layers) -> list:
    """Count each layer's calls, and those given a nested tensor: `[calls, nested calls]`. Counted by the instance's
    forward, not by a hook: a hook of ours would itself keep torch's fast path out, and hide whether the layer's does."""
    counts = [0, 0]
    for layer in layers:
        def counted(query, *args, _forward=layer.forward, **kwargs):
            counts[0] += 1
            counts[1] += bool(query.is_nested)
            return _forward(query, *args, **kwargs)
        layer.forward = counted
    return counts


def _container(name: str, device) -> tuple:
    "Torch's container `name`, float64, without dropout, randomised; the call that runs it, and the token rows to compare."
    factory = dict(dtype=DTYPE, device=device)
    torch.manual_seed(0)
    src, tgt = torch.randn(B, 7, D, **factory), torch.randn(B, 5, D, **factory)
    padding = torch.zeros(B, 7, dtype=torch.bool, device=device); padding[0, -3:] = True; padding[2, -1:] = True  # right padding
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, **factory)
    real, every = ~padding, torch.ones(B, 5, dtype=torch.bool, device=device)
    encoder_layer = lambda norm_first=False: nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first, **factory)
    decoder_layer = lambda norm_first=False: nn.TransformerDecoderLayer(D, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first, **factory)
    encode = lambda m: m(src, src_key_padding_mask=padding)
    made = {
        'encoder layer': lambda: (encoder_layer(), encode, real),
        'encoder layer, norm first': lambda: (encoder_layer(True), lambda m: m(src, src_key_padding_mask=padding, src_mask=causal_mask(7, 7, device)), real),
        'encoder, nested': lambda: (nn.TransformerEncoder(encoder_layer(), 2, enable_nested_tensor=True), encode, real),
        'encoder, not nested': lambda: (nn.TransformerEncoder(encoder_layer(), 2, enable_nested_tensor=False), encode, real),
        'decoder layer': lambda: (decoder_layer(), lambda m: m(tgt, src, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=padding), every),
        'decoder layer, norm first': lambda: (decoder_layer(True), lambda m: m(tgt, src, tgt_mask=causal_mask(5, 5, device), memory_key_padding_mask=padding,
                                                                               tgt_key_padding_mask=padding[:, :5]), every),
        'transformer': lambda: (nn.Transformer(D, H, 2, 2, 32, dropout=0.0, batch_first=True, **factory),
                                lambda m: m(src, tgt, src_key_padding_mask=padding, memory_key_padding_mask=padding, tgt_mask=tgt_mask), every)}
    container, run, rows = made[name]()
    nests = getattr(container, 'encoder', container)
    assert getattr(nests, 'use_nested_tensor', False) is (name in ('encoder, nested', 'transformer'))
    return randomise(container), run, rows


CONTAINERS = ['encoder layer', 'encoder layer, norm first', 'encoder, nested', 'encoder, not nested', 'decoder layer',
              'decoder layer, norm first', 'transformer']


@KINDS
@pytest.mark.parametrize('name', CONTAINERS)
@pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning')
def test_containers_call_the_layer(device, cls, name):
    """In evaluation mode without gradients (where torch's fast paths would run), each container around layers with
    positional parameters gives (a) what it gives in training mode (no dropout), (b) not what it gives without positions
    (zero tables; rotary, ALiBi: torch's own attention), and (c) every layer's forward ran, on nested tensors where the encoder nests.
    Without the layers' own forward pre-hook, torch's fast path would be taken (and fail: the layer has no `merge_masks`)."""
    container, run, rows = _container(name, device)
    model, layers = _positional_twin(cls, container, positional=True)
    assert len(layers) == (6 if name == 'transformer' else 2 if name.startswith(('decoder', 'encoder,')) else 1)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules() if not any(m is layer.attn for layer in layers))
    without = container if cls in UNTABLED else _positional_twin(cls, container, positional=False)[0]
    counts = _count_calls(layers)
    with torch.no_grad(): out = run(model.eval())
    assert counts[0] == len(layers), counts
    nested = name == 'encoder, nested' or name == 'transformer'
    assert counts[1] == (2 if nested else 0), counts  # the encoder's two layers see nested tensors
    with torch.no_grad(): plain = run(without.eval())
    trained = run(model.train())
    assert counts[0] == 2 * len(layers)
    close(out[rows], trained[rows])
    assert (out[rows] - plain[rows]).abs().max() > 1e-3
    if name == 'encoder, nested': assert out[~rows].abs().max() == 0  # the nested path gives zeros for padding


@KINDS
def test_torch_builds_its_encoder_around_a_layer(cls):
    """`nn.TransformerEncoder` reads the layer's `batch_first`, `_qkv_same_embed_dim`, `in_proj_bias` and `num_heads` to
    decide on nested tensors: it builds without an AttributeError, and decides as for torch's attention built alike."""
    cases = {(): None, (('bias', False),): 'self_attn was passed bias=False', (('vdim', 12),): '_qkv_same_embed_dim was not True',
             (('batch_first', False),): 'self_attn.batch_first was not True'}
    for options, reason in cases.items():
        block = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True, dtype=DTYPE)
        block.self_attn = _layer(cls, D, H, **dict(options))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=True)
        messages = [str(w.message) for w in caught]
        assert encoder.use_nested_tensor is (reason is None), (options, messages)
        if reason: assert any(reason in m for m in messages), messages


# ---------------------------------------------------------------------------------------------------------------------
# 5. Conversion


@KINDS
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_from_mha_copies_everything(device, cls, training):
    "Weights (copies), options, device, dtype, training flag and requires_grad; then, without positions, the same results."
    torch.manual_seed(0)
    options = dict(bias=False, add_bias_kv=True, add_zero_attn=True, vdim=12, batch_first=True, dropout=0.2)
    if cls is not AdditivePosMultiheadAttention: options['kdim'] = 8
    mha = randomise(nn.MultiheadAttention(D, H, **options, dtype=DTYPE, device=device)).train(training)
    mha.bias_k.requires_grad_(False)  # a frozen parameter stays frozen
    layer = cls.from_mha(mha, **SIZES[cls])
    assert type(layer) is cls and layer.training is training and layer.attn.training is training
    for name in MHA_ATTRIBUTES + ('embed_dim', 'num_heads', 'head_dim', 'batch_first'):
        mine, torchs = getattr(layer, name), getattr(mha, name)
        if isinstance(torchs, nn.Module): mine, torchs = mine.state_dict(), torchs.state_dict()
        if isinstance(torchs, dict): assert all(torch.equal(mine[k], torchs[k]) for k in torchs), name
        elif isinstance(torchs, torch.Tensor): assert torch.equal(mine, torchs) and mine.data_ptr() != torchs.data_ptr(), name
        else: assert mine == torchs, name
    for (name, mine), torchs in zip(layer.attn.named_parameters(), mha.parameters()):
        assert mine.requires_grad == torchs.requires_grad and mine.dtype == DTYPE and mine.device.type == torch.device(device).type, name
    assert not layer.bias_k.requires_grad and layer.bias_v.requires_grad
    for p in positional_parameters(layer).values():
        assert p.dtype == DTYPE and p.device.type == torch.device(device).type and p.requires_grad and not p.any()
    x, key = torch.randn(B, TQ, D, dtype=DTYPE, device=device), torch.randn(B, TK, options.get('kdim', D), dtype=DTYPE, device=device)
    value = torch.randn(B, TK, 12, dtype=DTYPE, device=device)
    out, weights = _seeded(layer, x, key, value, need_weights=True, **_off(cls, TQ, TK, device))
    ref, ref_weights = _seeded(mha, x, key, value, need_weights=True)
    close(out, ref); close(weights, ref_weights)
    with torch.no_grad(): mha.out_proj.weight.add_(1.0)  # a copy: the layer does not follow
    close(_seeded(layer, x, key, value, **_off(cls, TQ, TK, device))[0], out)


def test_from_mha_keeps_float32_and_refuses_what_it_cannot_take():
    mha = nn.MultiheadAttention(D, H)
    layer = AdditivePosMultiheadAttention.from_mha(mha, max_len=8)
    assert layer.pos_emb.dtype == torch.float32 and layer.batch_first is False and layer.dropout == 0.0
    with pytest.raises(TypeError, match=r"mha must be an nn.MultiheadAttention, got Linear"): RoPEMultiheadAttention.from_mha(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"kdim must be embed_dim=16 for the additive table"):
        AdditivePosMultiheadAttention.from_mha(nn.MultiheadAttention(D, H, kdim=8), max_len=8)
    with pytest.raises(TypeError, match=r"max_len"): AdditivePosMultiheadAttention.from_mha(mha)  # the layer's own arguments are the caller's


def _models(device) -> dict:
    "An nn.TransformerEncoder (nested tensors on) and an nn.Transformer, float64, without dropout, randomised; with their calls."
    factory = dict(dtype=DTYPE, device=device)
    torch.manual_seed(0)
    src, tgt = torch.randn(B, 7, D, **factory), torch.randn(B, 5, D, **factory)
    padding = torch.zeros(B, 7, dtype=torch.bool, device=device); padding[0, -3:] = True
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, **factory)
    block = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True, **factory)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # its encoder does not nest sequence-first tensors, and says so
        sequence_first = randomise(nn.Transformer(D, H, 2, 2, 32, dropout=0.0, batch_first=False, **factory))
    return {'encoder': (randomise(nn.TransformerEncoder(block, 2, enable_nested_tensor=True)), lambda m: m(src, src_key_padding_mask=padding), 2),
            'transformer': (randomise(nn.Transformer(D, H, 2, 2, 32, dropout=0.0, batch_first=True, **factory)),
                            lambda m: m(src, tgt, src_key_padding_mask=padding, memory_key_padding_mask=padding, tgt_mask=tgt_mask), 6),
            'transformer, sequence first': (sequence_first, lambda m: m(src.transpose(0, 1), tgt.transpose(0, 1), src_key_padding_mask=padding,
                                                                      memory_key_padding_mask=padding, tgt_mask=tgt_mask), 6)}


MODELS = ['encoder', 'transformer', 'transformer, sequence first']


@TABLED
@pytest.mark.parametrize('name', MODELS)
@pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning')
def test_converted_models_compute_what_they_computed(device, cls, name):
    """`convert` replaces every nn.MultiheadAttention in place; the model computes what it computed (training mode, and
    evaluation mode where torch takes its fast paths), holds copies of the attention weights, and then learns its tables."""
    model, run, count = _models(device)[name]
    before = copy.deepcopy(model)
    old = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(old) == count
    converted = cls.convert(model, **SIZES[cls])
    assert converted is model
    layers = [m for m in converted.modules() if isinstance(m, cls)]
    assert len(layers) == count and all(isinstance(m, cls) or any(m is layer.attn for layer in layers)
                                        for m in converted.modules() if isinstance(m, (nn.MultiheadAttention, cls)))
    assert cls.convert(converted, **SIZES[cls]) is converted and [m for m in converted.modules() if isinstance(m, cls)] == layers  # twice: as once
    counts = _count_calls(layers)
    with torch.no_grad(): close(run(converted.eval()), run(before.eval()))
    close(run(converted.train()), run(before.train()))
    assert counts[0] == 2 * count
    with torch.no_grad():
        for mha in old:
            for p in mha.parameters(): p.add_(1.0)  # the old modules' weights are not the converted model's
    close(run(converted), run(before))
    tables = [p for layer in layers for p in positional_parameters(layer).values()]
    assert len(tables) == count and all(not t.any() for t in tables)
    optimiser = torch.optim.Adam(converted.parameters(), lr=1e-2)
    target = torch.randn_like(run(converted))
    losses = []
    for _ in range(3):
        loss = (run(converted) - target).pow(2).mean()
        optimiser.zero_grad(); loss.backward(); optimiser.step()
        losses.append(loss.item())
    assert all(t.any() for t in tables), 'every table moved'
    assert losses[-1] < losses[0]


@pytest.mark.parametrize('cls', UNTABLED, ids=['rotary', 'alibi'])
@pytest.mark.parametrize('name', MODELS)
@pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning')
def test_converted_models_with_rotary_or_alibi_layers_differ(device, cls, name):
    """Rotary layers turn queries and keys, ALiBi's penalise distance, at their default positions: a converted model does
    not compute what it computed. ALiBi with zero slopes does, and keeps its slopes zero while it learns."""
    model, run, count = _models(device)[name]
    before = copy.deepcopy(model)
    converted = cls.convert(copy.deepcopy(model))
    assert sum(isinstance(m, cls) for m in converted.modules()) == count
    with torch.no_grad(): assert (run(converted.eval()) - run(before.eval())).abs().max() > 1e-3
    if cls is RoPEMultiheadAttention: return
    zero = ALiBiMultiheadAttention.convert(model, slopes=torch.zeros(H))
    with torch.no_grad(): close(run(zero.eval()), run(before.eval()))
    close(run(zero.train()), run(before.train()))
    run(zero).pow(2).mean().backward()
    assert all(not m.slopes.any() and m.slopes.grad is None for m in zero.modules() if isinstance(m, cls))


@KINDS
def test_converting_an_attention_converts_it(device, cls):
    """An nn.MultiheadAttention passed to `convert` comes back converted. Rotary and ALiBi conversion is exact only at
    the layer with every position mask False; at default positions they turn queries and keys or penalise distance."""
    torch.manual_seed(0)
    mha = randomise(nn.MultiheadAttention(D, H, batch_first=True, dtype=DTYPE, device=device)).eval()
    layer = cls.convert(mha, **SIZES[cls])
    assert type(layer) is cls and layer is not mha
    x = torch.randn(B, TQ, D, dtype=DTYPE, device=device)
    close(layer(x, x, x, **_off(cls, TQ, TQ, device))[0], mha(x, x, x)[0])
    if cls in UNTABLED: assert (layer(x, x, x)[0] - mha(x, x, x)[0]).abs().max() > 1e-3
    else: close(layer(x, x, x)[0], mha(x, x, x)[0])
