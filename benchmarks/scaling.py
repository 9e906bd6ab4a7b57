"""How cost grows with length: each layer and the floor, time and memory saved for backward, against T.

    python benchmarks/scaling.py --json benchmarks/scaling.json --plot benchmarks/scaling.png   # full run, ~15 minutes
    python benchmarks/scaling.py --quick    # smoke run: T of 128 to 1024, two short rounds, ~2 minutes (one thread)
    python benchmarks/scaling.py --layers relative alibi --lengths 2048 4096 --json /tmp/long.json

Causal self-attention (issue 22, item 5), float32 on the CPU, `D = 256`, `H = 8`, default positions, at sequence
lengths `T` of 128, 256, 512, 1024, 2048 and 4096 with the number of tokens a call fixed, `B·T = 8192`: shapes
`(B, T) = (64, 128), (32, 256), (16, 512), (8, 1024), (4, 2048), (2, 4096)` (`--tokens` changes the product).
So the projections cost the same at every length, attention's `B·T²·D` work grows as `T`, and anything built once
a call for every pair of tokens, `(H, T, T)` whatever the batch, grows as `T²`: on a log-log plot of time against
`T` the slope says which of these a layer's time is made of. At `D = 256` the projections' `4·B·T·D²`
multiply-adds equal causal attention's `B·T²·D` at `T = 4D = 1024`, so even the floor's slope rises over the range,
from about 0.3 toward 1.

The layers (`--layers`, any of `harness.LAYERS`; by default `additive`, `relative`, `rotary` and `alibi`), each built
as `harness.LAYERS` says (the additive layer with `max_len=2T`, the relative one clipping offsets at 128, tables
random), are called as `layer(x, x, x, is_causal=True)`. Every layer's `attn` holds the same weights
(`overhead.make_layers`), and two baselines run on them, causal alike:

- `mha`: bare `nn.MultiheadAttention`, `attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)` (torch
  then drops the boolean mask for its causal kernel where it can);
- `floor`: `causal_floor_attention`, `harness.floor_attention`'s packed in-projection, `F.scaled_dot_product_attention`
  with `is_causal=True` (the causal kernel, which skips the blocks above the diagonal) and the output projection.

The floor of a case is the faster of the two by median (as in `overhead.py`); before timing, the script checks in
eval that both compute the same (float32, to 1e-4). Each length runs two ways: eval forward under `no_grad`
(`forward`), and forward plus backward in train mode (`forward+backward`; inputs require grad, the output's
gradient a tensor of ones, parameter gradients accumulating as in training).

Timing is `harness.time_case`: interleaved rounds, the order of the implementations rotating each round, and paired
ratios (`harness.paired_ratio`, `paired_quartiles`: each round's ratio of a layer to the floor timed beside it, the
median over rounds and the middle half of the rounds). Defaults as `decoding.py`'s: one torch thread and this
process's CPU time (`--threads`, `--timer`), the options recommended on a shared machine; 15 rounds of 0.1 s per
implementation (`--rounds`, `--min-run-time`; a call longer than that is timed once a round). In training the bytes
autograd saves for backward in one call (`harness.saved_bytes`: distinct storages, parameters left out) are counted
for every layer and both baselines, in units of one `(B, T, D)` float32 tensor (8 MiB at every length here); the
floor's figure is the lesser of the two baselines'.

Memory: a layer that makes `(B, H, T, T)` float32 tensors holds 1 GiB in each at `T = 4096` (and `B = 2`), and the
relative layer's training keeps several. Before the cases, the script caps its address space (`RLIMIT_AS`) at what
it maps plus `--memory-limit` GiB (default: 90% of the memory available at start; 0: no cap), so that a call that
would exhaust memory fails with torch's allocation error instead of the kernel's OOM killer ending the run. Each
implementation is called once before timing; one that runs out of memory then (or while timed, or while its saved
bytes are counted) is dropped from its case and its row kept with `skipped` and the reason; the others are timed.

The goal (issue 22): a reader sees each scheme's slope. `figure(rows)` draws time per call against `T` (log-log;
eval, training) and the units saved for backward (training), every layer and the floor; `summary(rows)` gives per
layer and mode the slope (least squares of log time on log T, and between the two largest T) and the ratio to the
floor at the smallest and the largest T. `--quick` (CI's smoke run): two short rounds (0.05 s), T up to 1024;
`--lengths` picks lengths (any that divide `--tokens`; they override `--quick`'s cap), `--shapes` indices into them.
"""
import argparse, gc, json, math, resource, statistics, sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (LAYERS, MODES, add_timing_args, clock, command_line, header, log, machine,
                     make_inputs, markdown, paired_quartiles, paired_ratio, progress, quartiles_text, saved_bytes,
                     setup, split_heads, text_table, time_case, timed)
from overhead import first, layer_classes, make_layers

TOKENS, D_MODEL, HEADS = 8192, 256, 8  # B·T fixed; the model width and heads of every case
LENGTHS, QUICK_MAX = (128, 256, 512, 1024, 2048, 4096), 1024  # T; --quick stops at QUICK_MAX
DEFAULT_LAYERS = ('additive', 'relative', 'rotary', 'alibi')
BASELINES = ('mha', 'floor')
MEMORY_SHARE = 0.9  # the default --memory-limit: this share of the memory available at start


def shape_of(T, tokens=TOKENS, d_model=D_MODEL, heads=HEADS):
    "The case's `(B, T, D, H)` at length `T`: `B = tokens / T`."
    return (tokens // T, T, d_model, heads)


# ---- the causal floor


def causal_floor_attention(attn: torch.nn.MultiheadAttention, x):
    """Causal self-attention without positions at its cheapest: `harness.floor_attention`'s packed in-projection and
    head split, `F.scaled_dot_product_attention(..., is_causal=True)` (no mask, no dropout), the output projection."""
    q, k, v = split_heads(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), attn.num_heads, 3)
    B, H, T, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(B, T, H * d), attn.out_proj.weight, attn.out_proj.bias)


def causal_mask(T, device='cpu'):
    "`nn.MultiheadAttention`'s boolean causal mask `(T, T)`: True above the diagonal, where a query may not look."
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def causal_baselines(attn, x, mask):
    "The floor's callables for causal self-attention, each returning the output: bare MHA ('mha'), the packed 'floor'."
    return {'mha': lambda: attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0],
            'floor': lambda: causal_floor_attention(attn, x)}


def implementations(layers, x, mask):
    "The callables of a case: every layer (`layer(x, x, x, is_causal=True)`), bare MHA and the floor."
    calls = {name: (lambda layer=layer: layer(x, x, x, is_causal=True)[0]) for name, layer in layers.items()}
    return {**calls, **causal_baselines(first(layers).attn, x, mask)}


# ---- running out of memory: a row skipped, not a run ended


def out_of_memory(e: BaseException) -> bool:
    "Whether `e` is an allocation failure (torch's CPU or CUDA allocator, or Python's), as opposed to a bug."
    if isinstance(e, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))): return True
    words = ("can't allocate memory", 'not enough memory', 'out of memory', 'Cannot allocate memory')
    return isinstance(e, RuntimeError) and any(w in str(e) for w in words)


def reason(e: BaseException, when: str) -> str:
    "The skipped row's reason: what ran out of memory, and the first line of the error (200 characters at most)."
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = next((line for line in lines if 'memory' in line), lines[0])
    return f'out of memory {when}: {text[:200]}'


def probe(stmts, skipped, when='at its first call'):
    """Call each statement once (a warm-up); those that run out of memory leave `stmts` for `skipped` with the reason.
    Any other error propagates."""
    for name in list(stmts):
        try: stmts[name]()
        except Exception as e:
            if not out_of_memory(e): raise
            skipped[name] = reason(e, when)
            del stmts[name]
        gc.collect()


def limit_memory(gib):
    """Cap this process's address space at what it maps now plus `gib` GiB (`RLIMIT_AS`), so that an allocation past
    it fails in torch (a skipped row) rather than in the kernel's OOM killer; `gib` None: 90% of `MemAvailable`, 0: no
    cap. Returns what was done, for the record."""
    if gib == 0: return 'no cap'
    try:
        status = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines() if ':' in line)
        mapped = int(status['VmSize'].split()[0]) * 1024
        if gib is None:
            info = dict(line.split(':', 1) for line in Path('/proc/meminfo').read_text().splitlines() if ':' in line)
            gib = MEMORY_SHARE * int(info['MemAvailable'].split()[0]) * 1024 / 2**30
        resource.setrlimit(resource.RLIMIT_AS, (mapped + int(gib * 2**30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, KeyError, ValueError) as e: return f'no cap ({type(e).__name__}: {e})'
    return f'address space capped at {gib:.1f} GiB beyond the {mapped / 2**30:.1f} GiB mapped at start'


# ---- one case: a length and a mode


def check_floor(fns, tol=1e-4):
    "Assert that bare MHA with the causal mask and the causal floor compute the same (eval, float32, to `tol`)."
    with torch.no_grad(): floor, mha = fns['floor'](), fns['mha']()
    torch.testing.assert_close(floor, mha, rtol=tol, atol=tol,
                               msg=lambda m: f'the causal floor differs from bare MHA: {m}')


def case_common(shape, mode, rounds, times, saved, skipped, btd_bytes):
    "The fields every row of a case shares: the case, the floor's times and saved bytes, the baselines skipped."
    B, T, D, H = shape
    common = dict(device='cpu', dtype='float32', B=B, T=T, D=D, H=H, tokens=B * T, attention='self', causal=True,
                  mode=mode, rounds=rounds)
    present = [n for n in BASELINES if n in times]
    if present:
        floor = min(present, key=lambda n: times[n][0])  # the floor of the case: the faster by median
        common.update(floor=floor, floor_ms_min=times[floor][0] * 1e3,
                      **{f'{n}_ms': times[n][0] * 1e3 for n in present}, blocks=min(t[2] for t in times.values()))
        if len(present) == 2: common['mha_vs_floor'] = paired_ratio(times, 'mha', floor)
    counted = [n for n in BASELINES if n in saved]
    if counted:
        common.update(btd_bytes=btd_bytes, **{f'{n}_saved_bytes': saved[n] for n in counted},
                      floor_saved_btd=min(saved[n] for n in counted) / btd_bytes)
    lost = {n: skipped[n] for n in BASELINES if n in skipped}
    if lost: common['baselines_skipped'] = lost
    return common


def layer_row(name, common, times, saved, skipped):
    "One layer's row: the case's fields, then its time and paired ratios and saved bytes, or `skipped` and why."
    row = dict(layer=name, **common)
    if name not in times:
        lost = common.get('baselines_skipped', {})
        row['skipped'] = skipped.get(name) or 'no floor: ' + '; '.join(f'{n} {r}' for n, r in lost.items())
        return row
    floor = common['floor']
    row.update(layer_ms=times[name][0] * 1e3, layer_iqr_ms=times[name][1] * 1e3,
               layer_vs_floor=paired_ratio(times, name, floor),
               layer_vs_floor_quartiles=paired_quartiles(times, name, floor))
    if 'mha' in times: row['layer_vs_mha'] = paired_ratio(times, name, 'mha')
    if name in saved: row.update(layer_saved_bytes=saved[name], layer_saved_btd=saved[name] / common['btd_bytes'])
    elif name in skipped: row['saved_skipped'] = skipped[name]
    return row


def run_case(classes, shape, mode, opts, timer):
    """One length and mode: the layers and baselines built on the same weights, each called once (those that run out
    of memory dropped), the floor checked (eval), the rest timed in paired rounds and, in training, their saved bytes
    counted. Returns one row a layer."""
    T = shape[1]
    layers = {name: layer.train(mode != 'forward') for name, layer in make_layers(classes, shape).items()}
    x, _, grad = make_inputs(shape, 'self', mode)
    fns = implementations(layers, x, causal_mask(T))
    stmts, skipped, times, saved = timed(fns, grad), {}, {}, {}
    probe(stmts, skipped)
    if mode == 'forward' and all(n in stmts for n in BASELINES): check_floor(fns)
    if any(n in stmts for n in BASELINES):
        try: times = time_case(stmts, rounds=opts['rounds'], min_run_time=opts['min_run_time'],
                               num_threads=opts['num_threads'], timer=timer)
        except Exception as e:
            if not out_of_memory(e): raise
            skipped.update({n: reason(e, 'while timed') for n in stmts})
    if mode == 'forward+backward':
        for name in times:
            try: saved[name] = saved_bytes(layers.get(name, first(layers)), fns[name])
            except Exception as e:
                if not out_of_memory(e): raise
                skipped[name] = reason(e, 'while its saved bytes were counted')
            gc.collect()
    common = case_common(shape, mode, opts['rounds'], times, saved, skipped, x.numel() * x.element_size())
    return [layer_row(name, common, times, saved, skipped) for name in layers]


def lengths_of(args):
    "The lengths to run: `--lengths`, else `LENGTHS` (up to `QUICK_MAX` with `--quick`); `--shapes` indexes them."
    lengths = list(args.lengths or [T for T in LENGTHS if not args.quick or T <= QUICK_MAX])
    return [lengths[i] for i in args.shapes] if args.shapes else lengths


def describe(case):
    T, mode, tokens = case
    return f'T={T} (B={tokens // T}) {mode}'


def case_line(rows):
    "A log line after a case: the floor's time and each layer's ratio to it (or 'skipped')."
    floor = next((f'floor {r["floor_ms_min"]:.2f} ms' for r in rows if 'floor_ms_min' in r), 'no floor')
    layers = [f'{r["layer"]} {r["layer_vs_floor"]:.2f}' if 'layer_ms' in r else f'{r["layer"]} skipped' for r in rows]
    return '  ' + ', '.join([floor] + layers)


def run(args):
    classes = layer_classes(args.layers or list(DEFAULT_LAYERS))
    opts = setup(args)
    memory = limit_memory(args.memory_limit)
    log(f'memory: {memory}')
    lengths, timer, rows = lengths_of(args), clock('cpu', args.timer), []
    for T, mode, tokens in progress([(T, mode, args.tokens) for T in lengths for mode in MODES], describe):
        rows += (case := run_case(classes, shape_of(T, args.tokens), mode, opts, timer))
        log(case_line(case))
        gc.collect()
    meta = dict(machine(opts['num_threads'], command_line('scaling.py', args.argv), args.timer, args.quick),
                malloc=opts['malloc'], memory=memory, layers=list(classes), tokens=args.tokens, D=D_MODEL, H=HEADS,
                lengths=lengths, min_run_time=opts['min_run_time'])
    return dict(meta=meta, rows=rows)


# ---- reporting


def layers_of(rows):
    "The layers of `rows`, in the order of `harness.LAYERS`."
    present = {r['layer'] for r in rows}
    return [name for name in LAYERS if name in present]


def points(rows, mode, key, layer=None):
    """`[(T, value)]` sorted by T: `key` of `layer`'s rows in `mode` where it was measured; with `layer` None, of the
    case (the floor's fields, the same in every row of a case: the first row that has it)."""
    found = {}
    for r in rows:
        if r['mode'] == mode and key in r and (layer is None or r['layer'] == layer): found.setdefault(r['T'], r[key])
    return sorted(found.items())


def skipped_lengths(rows, mode, layer):
    "The lengths at which `layer`'s row in `mode` was skipped."
    return sorted(r['T'] for r in rows if r['mode'] == mode and r['layer'] == layer and 'skipped' in r)


def slope(pts):
    "The least-squares slope of log value on log T over `pts` `[(T, value)]`; None under two lengths."
    if len(pts) < 2: return None
    return statistics.linear_regression([math.log(t) for t, _ in pts], [math.log(v) for _, v in pts]).slope


def end_slope(pts):
    "The slope between the two largest lengths of `pts` (the last step of the log-log curve); None under two lengths."
    if len(pts) < 2: return None
    (t0, v0), (t1, v1) = pts[-2:]
    return math.log(v1 / v0) / math.log(t1 / t0)


def slope_text(pts):
    "A curve's slopes in words: the fit over every length, and the last step."
    if len(pts) < 2: return 'slope: one length only'
    return (f'slope {slope(pts):.2f} (fit over T={pts[0][0]} to {pts[-1][0]}; '
            f'{end_slope(pts):.2f} from T={pts[-2][0]} to {pts[-1][0]})')


MODE_NAMES = {'forward': 'eval', 'forward+backward': 'training'}


def summary(rows):
    """Closing lines: the floor's slopes, then per layer and mode the slope of its time against T, its ratio to the
    floor at the smallest and largest T, and in training its units saved for backward at both ends; the rows skipped."""
    lines = []
    for mode in MODES:
        floor = points(rows, mode, 'floor_ms_min')
        if floor: lines.append(f'floor, {MODE_NAMES[mode]}: {slope_text(floor)}; {floor[0][1]:.2f} ms at '
                               f'T={floor[0][0]}, {floor[-1][1]:.2f} ms at T={floor[-1][0]}')
    saved = points(rows, 'forward+backward', 'floor_saved_btd')
    if saved: lines.append(f'floor, saved for backward: {saved[0][1]:.2f} (B, T, D) at T={saved[0][0]}, '
                           f'{saved[-1][1]:.2f} at T={saved[-1][0]}')
    for name in layers_of(rows):
        for mode in MODES:
            times, ratios = points(rows, mode, 'layer_ms', name), points(rows, mode, 'layer_vs_floor', name)
            if not times: continue
            line = (f'{name}, {MODE_NAMES[mode]}: {slope_text(times)}; {ratios[0][1]:.2f} times the floor at '
                    f'T={ratios[0][0]}, {ratios[-1][1]:.2f} at T={ratios[-1][0]}')
            units = points(rows, mode, 'layer_saved_btd', name)
            if units: line += (f'; saved for backward {units[0][1]:.2f} (B, T, D) at T={units[0][0]}, '
                               f'{units[-1][1]:.2f} at T={units[-1][0]}')
            lines.append(line)
    lines += [f'skipped: {r["layer"]} at T={r["T"]}, {r["mode"]}: {r["skipped"]}' for r in rows if 'skipped' in r]
    return '\n'.join(lines)


HEAD = ['layer', '(B, T, D, H)', 'mode', 'layer ms', 'floor ms', 'floor', 'layer / floor', 'middle half of rounds',
        'saved (B, T, D): layer', 'floor', 'skipped']


def cells(rows):
    "One row of cells per layer, length and mode (times in ms, saved bytes in `(B, T, D)` tensors)."
    out = []
    for r in rows:
        timed_ = 'layer_ms' in r
        out.append([r['layer'], f'({r["B"]}, {r["T"]}, {r["D"]}, {r["H"]})', MODE_NAMES[r['mode']],
                    f'{r["layer_ms"]:.2f}' if timed_ else '', f'{r["floor_ms_min"]:.2f}' if 'floor_ms_min' in r else '',
                    r.get('floor', ''), f'{r["layer_vs_floor"]:.3f}' if timed_ else '',
                    quartiles_text(r['layer_vs_floor_quartiles']) if timed_ else '',
                    f'{r["layer_saved_btd"]:.2f}' if 'layer_saved_btd' in r else '',
                    f'{r["floor_saved_btd"]:.2f}' if 'floor_saved_btd' in r else '', r.get('skipped', '')])
    return out


def table(rows):
    "The rows as a fixed-width text table."
    return text_table(HEAD, cells(rows))


def markdown_table(rows):
    "The rows as a Markdown table."
    return markdown(HEAD, cells(rows), left=3)


def report(results):
    "What the script prints: the run, the table, the closing lines."
    return '\n'.join([header(results['meta']), table(results['rows']), summary(results['rows'])])


def guides(ax, pts, slopes):
    """Grey lines of the given slopes (1 dotted, others dash-dotted) through the first of `pts`, for reading the
    curves' slopes by eye; each stops at twice the highest curve drawn, so that the guides do not set the scale."""
    top = 2 * max(max(line.get_ydata()) for line in ax.get_lines())
    (t0, v0), t1 = pts[0], pts[-1][0]
    for k in slopes:
        end = min(t1, t0 * (top / v0) ** (1 / k))
        ax.plot([t0, end], [v0, v0 * (end / t0) ** k], ':' if k == 1 else '-.', color='grey', lw=1,
                label=f'slope {k}: grows as T^{k}')


def curves(ax, rows, mode, key, floor_key):
    "Every layer's `key` against T in `mode`, and the floor's `floor_key` (a dashed black line)."
    for name in layers_of(rows):
        pts, lost = points(rows, mode, key, name), skipped_lengths(rows, mode, name)
        if pts or lost:
            label = name + (f' (skipped at T={", ".join(map(str, lost))})' if lost else '')
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker='o', markersize=4, label=label)
    floor = points(rows, mode, floor_key)
    if floor: ax.plot([t for t, _ in floor], [v for _, v in floor], '--', color='black', marker='s', markersize=4,
                      label='floor (no positions)')
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 128, 256, ... rather than powers of two
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 5, 10, 20, 50, ... as plain numbers
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('sequence length T (B·T fixed)')
    return floor


def figure(rows):
    """Three panels against T, every layer and the floor: time per call in eval and in training (ms, log-log, with
    guides of slope 1 and 2 through the floor's first point), and what training saves for backward, in `(B, T, D)`
    tensors. A matplotlib `Figure`."""
    from matplotlib.figure import Figure  # no pyplot: works headless and in notebooks alike
    fig = Figure(figsize=(15, 4.8))
    axes = fig.subplots(1, 3)
    for ax, mode in zip(axes, MODES):
        floor = curves(ax, rows, mode, 'layer_ms', 'floor_ms_min')
        if floor: guides(ax, floor, (1, 2))
        ax.set_ylabel('time per call, ms')
        what = 'forward under no_grad' if mode == 'forward' else 'forward and backward'
        ax.set_title(f'{MODE_NAMES[mode]}: {what}', fontsize=10)
    floor = curves(axes[2], rows, 'forward+backward', 'layer_saved_btd', 'floor_saved_btd')
    if floor: guides(axes[2], floor, (1,))
    axes[2].set_ylabel('saved for backward, (B, T, D) tensors')
    axes[2].set_title('training: memory saved for backward (eval saves none)', fontsize=10)
    for ax in axes: ax.legend(fontsize=7)
    r = rows[0] if rows else dict(tokens=TOKENS, D=D_MODEL, H=HEADS)
    fig.suptitle(f'How cost grows with length: causal self-attention, B·T = {r["tokens"]}, D = {r["D"]}, H = {r["H"]}',
                 fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(p, quick_help=f'two short rounds, T up to {QUICK_MAX}: a smoke run', quick_rounds=2, threads=1,
                    timer='process')
    p.add_argument('--layers', nargs='+', choices=list(LAYERS),
                   help=f'the layers to time (default: {" ".join(DEFAULT_LAYERS)})')
    p.add_argument('--lengths', nargs='+', type=int, metavar='T',
                   help=f'the lengths to run (default: {" ".join(map(str, LENGTHS))}; --quick: up to {QUICK_MAX})')
    p.add_argument('--tokens', type=int, default=TOKENS, help=f'B·T of every case (default {TOKENS})')
    p.add_argument('--memory-limit', type=float, metavar='GIB',
                   help='cap the address space this many GiB beyond what is mapped at start (default: '
                        f'{MEMORY_SHARE * 100:.0f}%% of the memory available; 0: no cap); a case past it is skipped, '
                        'not the run')
    p.add_argument('--plot', metavar='PATH', help='write figure(rows) to PATH')
    args = p.parse_args(argv)
    bad = [T for T in args.lengths or [] if T < 1 or args.tokens % T]
    if bad: p.error(f'--lengths: each T must divide --tokens ({args.tokens}); got {bad}')
    count = len(args.lengths or [T for T in LENGTHS if not args.quick or T <= QUICK_MAX])
    if any(not 0 <= i < count for i in args.shapes or []):
        p.error(f'--shapes: indices into the {count} lengths; got {args.shapes}')
    args.argv = argv
    results = run(args)
    print(report(results))
    if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot: figure(results['rows']).savefig(args.plot, dpi=120)
    return results


if __name__ == '__main__':
    main()
