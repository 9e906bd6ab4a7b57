"""Which fast paths earn their place: each way of computing the layer, timed against the next simpler one.

    python benchmarks/paths.py --threads 1 --timer process --rounds 15 --json benchmarks/paths.json
    python benchmarks/paths.py --quick            # smoke run, under a minute

The layer computes `attn(x + E, x + E, x)` for self-attention with default positions (`E = table[:T]`, the
same rows for queries and keys, none for values). Each candidate is written here as a small function of an
`nn.MultiheadAttention` (batch_first) and the table, in plain torch, so the benchmark does not depend on how
the package arranges its code:

- `plain`: the definition, `attn(s, s, x)` with `s = x + E` (the shifted input made once);
- `fused`: `s` projected by one packed `(2D, D)` product for queries and keys, `x` by the `(D, D)` value
  product, then `scaled_dot_product_attention` and the output projection;
- `per_call` (training): the rows `[E W_qᵀ + b_q, E W_kᵀ + b_k, b_v]` projected on every call and added to
  the floor's packed `(3D, D)` product of `x`;
- `cached` (eval without gradients): the same rows projected once, outside the timed call (its best case:
  every call a hit), copied into the packed product's output and the product added by `addmm_`.

Before timing, every path is checked against `plain` in float64 to 1e-12: the outputs, and in training the
gradients of `x`, the table and the in-projection weight. Eval forward under `no_grad` times plain, fused
and cached; training forward plus backward times plain, fused and per_call, at every shape whatever the batch.
Beside them run the floor (`harness.floor_attention` and bare MHA without positions; the faster is the floor).

The rule (the issue's): a path is kept where it gains at least 3% over the next simpler path (fused over
plain; per_call and cached over fused), paired median over rounds, at two or more of the four CPU shapes.

With `--bias` the script measures instead the paths of a positional bias (issue 22), the package's own layers at
the default positions, causal self-attention: the relative layer (clipped at 128, and T5's 32 buckets) and ALiBi
(the paper's slopes), each its new path forced (the ramp path; the band path, and in training where the band does
not pay, `BIAS_PATH_MIN`, the dense or the weights path, as the dispatch picks between them) and the mask path it
replaces (`fused_attention` with the bias as a mask, as before), beside the causal floor (`causal_floor`: packed
projection, SDPA's causal kernel, out-projection), at the four CPU shapes and at T = 2048 and 4096 (`BIAS_SHAPES`;
the mask path is left out where its (B, H, T, T) tensors would not fit beside the others, `MASK_MAX_T`); and up to
`BIDIRECTIONAL_MAX_T` the clipped layer and ALiBi without a causal mask ('relative-bi', 'alibi-bi': the path the
dispatch takes, and the mask path beside it: in eval and for ALiBi the toeplitz path from `TOEPLITZ_MIN` on; for
the learned table in training the band path from `BIAS_PATH_MIN` times the reach on, below it the dense or weights
path; where the dispatch keeps the mask path, that alone) beside a floor of its own, SDPA without a mask
('floor-bi'). In training it counts the bytes saved for backward in units of one (B, T, D):

    python benchmarks/paths.py --bias --threads 1 --timer process --rounds 7 --json benchmarks/bias_paths.json
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (CPU_SHAPES, MODES, attend, baselines, clock, command_line, floor_of, header, log, machine, make_inputs,
                     markdown, paired, progress, quartiles_text, script, setup, shape_text, split_heads, text_table, time_case, timed)

PATHS = {'forward': ('plain', 'fused', 'cached'), 'forward+backward': ('plain', 'fused', 'per_call')}
SIMPLER = {'fused': 'plain', 'cached': 'fused', 'per_call': 'fused'}  # each path against the next simpler one
GAIN, SHAPES_NEEDED = 0.03, 2  # the rule: a paired gain of at least 3% at two or more shapes


def plain(attn, x, table):
    "The definition: `attn(x + E, x + E, x)`."
    s = x + table[:x.shape[1]]
    return attn(s, s, x, need_weights=False)[0]


def fused(attn, x, table):
    "One packed `(2D, D)` product of the shifted input for queries and keys, the value product of `x`, SDPA, out-projection."
    D, H = x.shape[-1], attn.num_heads
    (w_qk, w_v), (b_qk, b_v) = attn.in_proj_weight.split_with_sizes([2 * D, D]), attn.in_proj_bias.split_with_sizes([2 * D, D])
    v = split_heads(F.linear(x, w_v, b_v), H)
    return attend(attn, *split_heads(F.linear(x + table[:x.shape[1]], w_qk, b_qk), H, 2), v)


def project_table(attn, table):
    "What each row of `table` adds to the packed in-projection, biases included: `[E W_qᵀ + b_q, E W_kᵀ + b_k, b_v]`, `(L, 3D)`."
    D = attn.embed_dim
    return F.pad(F.linear(table, attn.in_proj_weight[:2 * D]), (0, D)) + attn.in_proj_bias


def per_call(attn, x, table):
    "The rows of `table[:T]` projected on this call and added to the packed `(3D, D)` product of `x`."
    qkv = F.linear(x, attn.in_proj_weight).add_(project_table(attn, table[:x.shape[1]]))
    return attend(attn, *split_heads(qkv, attn.num_heads, 3))


def cached(attn, x, rows):
    "The packed product of `x` started from projected rows kept from before (`project_table`, no gradients)."
    B, T, D = x.shape
    qkv = x.new_empty(B, T, 3 * D).copy_(rows[:T])
    qkv.view(-1, 3 * D).addmm_(x.reshape(-1, D), attn.in_proj_weight.t())
    return attend(attn, *split_heads(qkv, attn.num_heads, 3))


def make_model(shape, dtype=torch.float32, seed=0):
    "A seeded `nn.MultiheadAttention` (batch_first, with biases) and a random `(2T, D)` table that requires grad."
    B, T, D, H = shape
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(D, H, batch_first=True, dtype=dtype)
    table = nn.Parameter(0.02 * torch.randn(2 * T, D, dtype=dtype))
    return attn, table


def path_calls(attn, table, x, mode):
    "The callables of a mode (each returning the output), paths and floor, on the same weights and inputs."
    attn.train(mode != 'forward')
    calls = {'plain': lambda: plain(attn, x, table), 'fused': lambda: fused(attn, x, table)}
    if mode == 'forward':
        with torch.no_grad(): rows = project_table(attn, table)
        calls['cached'] = lambda: cached(attn, x, rows)
    else: calls['per_call'] = lambda: per_call(attn, x, table)
    return {**calls, **baselines(attn, x)}


def check(shape, tol=1e-12):
    "Assert, in float64, that every path equals `plain`: outputs in eval mode, outputs and gradients in training."
    attn, table = make_model(shape, torch.float64)
    for mode in MODES:
        x, _, grad = make_inputs(shape, 'self', mode, dtype=torch.float64)
        calls = path_calls(attn, table, x, mode)
        results = {}
        for name in PATHS[mode]:
            for t in (x, table, attn.in_proj_weight): t.grad = None
            with torch.set_grad_enabled(grad is not None):
                out = calls[name]()
                if grad is not None: out.backward(grad)
            results[name] = [out.detach()] + ([] if grad is None else [x.grad, table.grad, attn.in_proj_weight.grad])
        for name in PATHS[mode][1:]:
            for what, a, b in zip(('output', 'x.grad', 'table.grad', 'in_proj_weight.grad'), results[name], results['plain']):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f'{name} != plain, {what}, {mode}, {shape}: {m}')


def run(args):
    opts = setup(args)
    shapes = [CPU_SHAPES[i] for i in args.shapes] if args.shapes else CPU_SHAPES
    for shape in shapes: check(shape)
    log(f'every path equals plain in float64 to 1e-12 at {len(shapes)} shapes (outputs; gradients of x, table, in_proj_weight)')
    rows = []
    for shape, mode in progress([(s, m) for s in shapes for m in MODES], lambda c: f'(B, T, D, H)={c[0]} self {c[1]}'):
        attn, table = make_model(shape)
        x, _, grad = make_inputs(shape, 'self', mode)
        times = time_case(timed(path_calls(attn, table, x, mode), grad), rounds=opts['rounds'], min_run_time=opts['min_run_time'],
                          num_threads=opts['num_threads'], timer=clock('cpu', args.timer))
        floor = floor_of(times)
        rows.append(dict(B=shape[0], T=shape[1], D=shape[2], H=shape[3], mode=mode, floor=floor, rounds=opts['rounds'],
                         ms={n: t[0] * 1e3 for n, t in times.items()},
                         vs_simpler={p: paired(times, p, SIMPLER[p]) for p in PATHS[mode][1:]},
                         vs_floor={p: paired(times, p, floor) for p in PATHS[mode]}))
    meta = dict(machine(opts['num_threads'], command_line('paths.py', args.argv), args.timer, args.quick), malloc=opts['malloc'])
    return dict(meta=meta, rows=rows)


def decide(rows, gain=GAIN, needed=SHAPES_NEEDED):
    "Per path and mode: at how many shapes it gains at least `gain` over the next simpler path, and whether it is kept."
    out = []
    for mode in MODES:
        for path in PATHS[mode][1:]:
            sel = [r for r in rows if r['mode'] == mode]
            passing = [shape_text(r) for r in sel if r['vs_simpler'][path]['ratio'] <= 1 - gain]
            out.append(dict(path=path, simpler=SIMPLER[path], mode=mode, shapes=len(sel), passing=passing,
                            keep=len(passing) >= needed))
    return out


def cells(rows):
    "One row of cells per shape and path: ratio to the next simpler path (middle half of rounds), ratio to the floor."
    out = []
    for r in rows:
        for path in PATHS[r['mode']][1:]:
            s, f = r['vs_simpler'][path], r['vs_floor']
            gain = 1 - s['ratio']
            out.append([r['mode'], shape_text(r), f'{path} / {SIMPLER[path]}', f'{s["ratio"]:.3f}', quartiles_text(s['quartiles']),
                        f'{gain:+.1%}', 'yes' if gain >= GAIN else 'no', f'{f[SIMPLER[path]]["ratio"]:.3f}', f'{f[path]["ratio"]:.3f}'])
    return out


HEAD = ['mode', '(B, T, D, H)', 'path / simpler', 'ratio', 'middle half of rounds', 'gain', 'gain >= 3%', 'simpler / floor', 'path / floor']


def verdicts(rows):
    "The rule applied, one line per path."
    return '\n'.join(f'{d["path"]} over {d["simpler"]} ({d["mode"]}): {len(d["passing"])} of {d["shapes"]} shapes gain >= {GAIN:.0%}'
                     f'{" (" + ", ".join(d["passing"]) + ")" if d["passing"] else ""}: {"keep" if d["keep"] else "delete"}'
                     for d in decide(rows))


def markdown_table(rows):
    "The deciding table in Markdown."
    return markdown(HEAD, cells(rows), left=3)


def report(results):
    "What the script prints: the run, the deciding table, the verdicts."
    return '\n'.join([header(results['meta']), text_table(HEAD, cells(results['rows'])), verdicts(results['rows'])])


BIAS_SHAPES = CPU_SHAPES + [(1, 2048, 512, 8), (1, 4096, 512, 8)]
BIAS_LAYERS = ('relative', 'relative-t5', 'alibi', 'relative-bi', 'alibi-bi')  # -bi: without a causal mask
MASK_MAX_T = {'forward': 2048, 'forward+backward': 2048}  # past these lengths the mask path is not timed
BIDIRECTIONAL_MAX_T = 4096  # the layers without a causal mask up to here (their mask path not past MASK_MAX_T)
LEARNED_PATHS = {'relative-dense': 'dense_forward', 'relative-weights': 'weights_forward'}  # the layer's methods


def floor_of_call(name):
    "The floor a call is timed against: attention without a mask for the layer without a causal mask, else causal."
    return 'floor-bi' if bidirectional(name.split(':')[0]) else 'floor'


def bidirectional(layer_name):
    "Whether a layer of `BIAS_LAYERS` is timed without a causal mask."
    return layer_name.endswith('-bi')


def causal_floor(attn, x, is_causal=True):
    """Causal attention without positions at its cheapest: packed in-projection, SDPA's causal kernel, out-projection
    (with `is_causal=False`, the same without a mask)."""
    B, T, D = x.shape
    q, k, v = split_heads(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), attn.num_heads, 3)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return F.linear(out.transpose(1, 2).reshape(B, T, D), attn.out_proj.weight, attn.out_proj.bias)


def bias_calls(shape, x, mode):
    """The floor and, per layer, its new path ('new') and the mask path ('mask'), each returning the output; the
    layers. Without a causal mask (relative-bi, alibi-bi: the dispatch's path; where it keeps the mask, the mask
    path only) beside a floor of its own ('floor-bi')."""
    from additive_pos_attn.alibi import alibi_ramp_attention
    from additive_pos_attn.attention import fused_attention, offset_diagonals, toeplitz_attention
    import harness
    calls, layers = {}, {}
    T = shape[1]
    for name in BIAS_LAYERS:
        causal = not bidirectional(name)
        if not causal and T > BIDIRECTIONAL_MAX_T: continue
        spec = harness.LAYERS[name.removesuffix('-bi')]
        module = __import__(f'additive_pos_attn.{spec.module}', fromlist=[spec.cls])
        layer = harness.make_layer(getattr(module, spec.cls), shape, spec=spec).train(mode != 'forward')
        layers[name] = layer
        with torch.set_grad_enabled(mode != 'forward'):
            chosen = layer_path(layer, x, causal)['name']
        if name == 'alibi':
            calls[f'{name}:new'] = lambda layer=layer: alibi_ramp_attention(layer.attn, x, layer.slopes)
        elif chosen == 'toeplitz':
            calls[f'{name}:new'] = lambda layer=layer: toeplitz_attention(layer.attn, x, offset_diagonals(
                layer.pair_bias, T, x.device))
        elif chosen in LEARNED_PATHS:  # a learned table where the band does not serve
            forward = getattr(layer, LEARNED_PATHS[chosen])
            calls[f'{name}:new'] = lambda forward=forward, c=causal: forward(x, is_causal=c)
        elif chosen == 'relative-band' or (causal and T > max(layer.band_reaches(True))):  # forced where causal
            calls[f'{name}:new'] = lambda layer=layer, c=causal: layer.band_forward(x, is_causal=c)
        if T <= MASK_MAX_T[mode]:
            calls[f'{name}:mask'] = lambda layer=layer, c=causal: fused_attention(
                layer.attn, x, x, x, is_causal=c, logit_bias=layer.pair_bias(None, None, q_len=T, k_len=T))
    attn = layers['relative'].attn
    calls['floor'] = lambda: causal_floor(attn, x)
    if any(map(bidirectional, layers)): calls['floor-bi'] = lambda: causal_floor(attn, x, is_causal=False)
    return calls, layers


def layer_path(layer, x, is_causal=True):
    "The path `choose_path` takes for the layer's self-attention call of `x` (causal or not), and why."
    from additive_pos_attn.attention import BiasCall, choose_path
    kind = 'alibi' if hasattr(layer, 'slopes') else 'relative'
    reach = float(layer.slopes.abs().max()) if kind == 'alibi' else max(layer.band_reaches(is_causal))
    learned = kind == 'relative' and layer.rel_bias.requires_grad
    call = BiasCall(kind, x, x, x, is_causal, None, reach, learned)
    return choose_path(layer.attn, need_weights=False, bias=call)._asdict()


def run_bias(args):
    from harness import saved_bytes
    opts = setup(args)
    shapes = [BIAS_SHAPES[i] for i in args.shapes] if args.shapes else BIAS_SHAPES
    rows = []
    for shape, mode in progress([(s, m) for s in shapes for m in MODES], lambda c: f'(B, T, D, H)={c[0]} {c[1]}'):
        x, _, grad = make_inputs(shape, 'self', mode)
        calls, layers = bias_calls(shape, x, mode)
        units = {}
        if grad is not None:
            unit = x.numel() * x.element_size()
            for name, fn in calls.items():
                units[name] = saved_bytes(layers[name.split(':')[0]] if ':' in name else layers['relative'], fn) / unit
        times = time_case(timed(calls, grad), rounds=opts['rounds'], min_run_time=opts['min_run_time'],
                          num_threads=opts['num_threads'], timer=clock('cpu', args.timer))
        with torch.set_grad_enabled(mode != 'forward'):
            chosen = {name: layer_path(layer, x, not bidirectional(name)) for name, layer in layers.items()}
        rows.append(dict(B=shape[0], T=shape[1], D=shape[2], H=shape[3], mode=mode, rounds=opts['rounds'],
                         ms={n: t[0] * 1e3 for n, t in times.items()}, saved_units=units, chosen=chosen,
                         vs_floor={n: paired(times, n, floor_of_call(n)) for n in calls if not n.startswith('floor')}))
    argv = None if args.argv is None else ['--bias', *args.argv]  # main took --bias out
    meta = dict(machine(opts['num_threads'], command_line('paths.py', argv), args.timer, args.quick), malloc=opts['malloc'])
    return dict(meta=meta, rows=rows)


BIAS_HEAD = ['mode', '(B, T, D, H)', 'layer', 'new / floor', 'middle half', 'mask / floor', 'saved: new', 'mask', 'floor',
             'dispatch']


def bias_cells(rows):
    "One row per shape, mode and layer: new and mask path to the floor (paired), saved-for-backward units."
    out = []
    for r in rows:
        for name in (n for n in BIAS_LAYERS if n in r['chosen']):
            new, mask, saved = r['vs_floor'].get(f'{name}:new'), r['vs_floor'].get(f'{name}:mask'), r['saved_units']
            unit = lambda key: f'{saved[key]:.2f}' if key in saved else ''  # noqa: E731
            out.append([r['mode'], shape_text(r), name, f'{new["ratio"]:.3f}' if new else 'none',
                        quartiles_text(new['quartiles']) if new else '',
                        f'{mask["ratio"]:.3f}' if mask else 'not timed', unit(f'{name}:new'), unit(f'{name}:mask'),
                        unit(floor_of_call(name)), r['chosen'][name]['name']])
    return out


def report_bias(results):
    return '\n'.join([header(results['meta']), text_table(BIAS_HEAD, bias_cells(results['rows']))])


def main(argv=None):
    given = sys.argv[1:] if argv is None else argv
    bias = '--bias' in given
    if bias: argv = [a for a in given if a != '--bias']
    return script(__doc__, run_bias if bias else run, report_bias if bias else report,
                  quick_help='fewer, shorter rounds: a smoke run under a minute', argv=argv)

if __name__ == '__main__':
    main()
