"""What the positions cost: `AdditivePosMultiheadAttention` against the attention it wraps.

    python benchmarks/overhead.py                 # full run, a few minutes on a laptop CPU
    python benchmarks/overhead.py --quick         # smoke run, under two minutes
    python benchmarks/overhead.py --json benchmarks/results.json --plot benchmarks/overhead.png

Three implementations run on the same inputs with the same weights (the layer's own `attn`):

- `layer`: `AdditivePosMultiheadAttention` as imported, with a random table and default positions;
- `mha`: bare `nn.MultiheadAttention(x, x, x)` (cross-attention: `(x, mem, mem)`), i.e. `layer.attn` alone;
- `floor`: the same weights as one packed input projection (`(x, mem)`: a query projection and a packed
  key/value projection), `F.scaled_dot_product_attention` and the output projection, with no positions.

The floor of a case is the faster of `mha` and `floor`: the cheapest way we know to compute the same
attention without positions. Cases: self- and cross-attention (memory as long as the query), forward in eval
mode under `no_grad`, and forward plus backward in train mode (inputs require grad, the output's gradient is a
fixed tensor of ones, parameter gradients accumulate as in training).

The harness (timing, floor, saved bytes) is `benchmarks/harness.py`, shared with `paths.py` (which fast paths
earn their place) and `compare.py` (a git revision of the layer against the working tree's).

Timing uses `torch.utils.benchmark.Timer.blocked_autorange`: each round times every implementation of a case
once, in an order that rotates from round to round, so that drift in the machine's load falls on all of them.
The times reported are the medians of all blocks pooled; the ratios are paired: each round gives a ratio of two
implementations timed side by side, and the reported ratio is the median over rounds, so that a burst of load
that spoils a round or two (on a shared machine they come and go) does not move it. Beside the layer's ratio to
the floor the table gives the middle half of the rounds' ratios (first to third quartile): how far single rounds
disagree, which is how much to trust a difference of a percent or two.

On CPU the timings also depend on how the C allocator hands out memory: glibc's `malloc` returns large blocks
to the system and maps them afresh (first touch of each page costs a fault) on a schedule that depends on
everything allocated before, so the same call can cost a few percent more in one position of a round than in
another. By default (`--malloc steady`) the benchmark fixes glibc's thresholds with `mallopt` (blocks under
32 MiB from the heap, which is never trimmed), as jemalloc or tcmalloc would behave; `--malloc system` leaves
them alone. Either way all implementations run under the same allocator.

Saved-for-backward bytes are counted with `torch.autograd.graph.saved_tensors_hooks` during one forward in
train mode: the sum of `untyped_storage().nbytes()` over the distinct storages (by `data_ptr`) of the tensors
autograd saves, leaving out the storages of parameters (autograd saves the weights, but they are in memory
anyway). Inputs are counted when saved (every implementation saves its input). Views count their whole
storage once. The figure does not depend on machine noise.
"""
import argparse, json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (CPU_SHAPES, MODES, add_timing_args, baselines, clock, floor_of, header, layer_call, machine, make_inputs,
                     make_layer, markdown, paired_quartiles, paired_ratio, progress, quartiles_text, saved_bytes, setup,
                     shape_text, text_table, time_case, timed)

from additive_pos_attn import AdditivePosMultiheadAttention

CUDA_SHAPES = [(16, 2048, 1024, 16)]
IMPLEMENTATIONS = ('layer', 'mha', 'floor')


def implementations(layer, x, mem):
    "The callables of a case, each returning the output tensor: the layer, bare MHA and the floor, on the same weights."
    return {'layer': layer_call(layer, x, mem), **baselines(layer.attn, x, mem)}


def make_case(shape, attention, mode, device, dtype):
    "Build the layer, inputs and the timed statements of one case; returns (layer, inputs, {name: stmt})."
    layer = make_layer(AdditivePosMultiheadAttention, shape, device, dtype).train(mode != 'forward')
    x, mem, grad = make_inputs(shape, attention, mode, device, dtype)
    return layer, (x, mem), timed(implementations(layer, x, mem), grad)


def run(args):
    devices = ['cpu', 'cuda'] if args.device == 'all' else [args.device]
    if 'cuda' in devices and not torch.cuda.is_available():
        if args.device == 'cuda': raise SystemExit('--device cuda: CUDA is not available')
        devices.remove('cuda')
    if args.timer == 'process' and 'cuda' in devices: raise SystemExit('--timer process measures CPU time: use it with --device cpu')
    opts = setup(args)
    plan = []
    for device in devices:
        shapes, dtype = (CPU_SHAPES, torch.float32) if device == 'cpu' else (CUDA_SHAPES, torch.bfloat16)
        if args.shapes: shapes = [shapes[i] for i in args.shapes]
        plan += [(device, dtype, shape, attention, mode) for shape in shapes for attention in ('self', 'cross') for mode in MODES]
    rows = []
    describe = lambda c: f'{c[0]} {str(c[1]).replace("torch.", "")} (B, T, D, H)={c[2]} {c[3]} {c[4]}'
    for device, dtype, shape, attention, mode in progress(plan, describe):
        layer, (x, mem), stmts = make_case(shape, attention, mode, device, dtype)
        times = time_case(stmts, rounds=opts['rounds'], min_run_time=opts['min_run_time'], num_threads=opts['num_threads'],
                          timer=clock(device, args.timer))
        row = dict(device=device, dtype=str(dtype).replace('torch.', ''), B=shape[0], T=shape[1], D=shape[2], H=shape[3],
                   attention=attention, mode=mode, **{f'{n}_ms': times[n][0] * 1e3 for n in IMPLEMENTATIONS},
                   **{f'{n}_iqr_ms': times[n][1] * 1e3 for n in IMPLEMENTATIONS},
                   blocks=min(t[2] for t in times.values()))
        row['floor_ms_min'] = min(row['mha_ms'], row['floor_ms'])
        best = floor_of(times)  # the floor of the case: the faster by median
        row['layer_vs_floor'] = paired_ratio(times, 'layer', best)
        row['layer_vs_floor_quartiles'] = paired_quartiles(times, 'layer', best)
        row['layer_vs_mha'] = paired_ratio(times, 'layer', 'mha')
        row['mha_vs_floor'] = paired_ratio(times, 'mha', best)
        row['rounds'] = opts['rounds']
        if mode == 'forward+backward':
            fns = implementations(layer, x, mem)
            for n in IMPLEMENTATIONS: row[f'{n}_saved_bytes'] = saved_bytes(layer, fns[n])
            row['btd_bytes'] = x.numel() * x.element_size()
        rows.append(row)
        del layer, x, mem, stmts
    command = ' '.join(['python benchmarks/overhead.py'] + argv_of(args))
    return dict(meta={**machine(opts['num_threads'], command, args.timer, args.quick), 'malloc': opts['malloc']}, rows=rows)


def argv_of(args):
    "The options that change what is measured, to print the command that reproduces a run."
    out = ['--quick'] if args.quick else []
    if args.device != 'all': out += ['--device', args.device]
    if args.threads: out += ['--threads', str(args.threads)]
    if args.timer != 'wall': out += ['--timer', args.timer]
    if args.malloc != 'steady': out += ['--malloc', args.malloc]
    if not args.quick and (args.rounds, args.min_run_time) != (15, 0.1): out += ['--rounds', str(args.rounds), '--min-run-time', str(args.min_run_time)]
    if args.shapes: out += ['--shapes'] + [str(i) for i in args.shapes]
    return out


HEAD = ['device', 'dtype', '(B, T, D, H)', 'attention', 'mode', 'layer ms', 'MHA ms', 'floor ms', 'layer / floor',
        'middle half of rounds', 'layer / MHA', 'MHA / floor', 'saved MiB: layer', 'MHA', 'extra (B, T, D)']


def cells(rows):
    "One row of cells per case (times in ms, saved bytes in MiB)."
    out = []
    for r in rows:
        saved = ['', '', '']
        if 'layer_saved_bytes' in r:
            saved = [f'{r["layer_saved_bytes"] / 2**20:.2f}', f'{r["mha_saved_bytes"] / 2**20:.2f}',
                     f'{(r["layer_saved_bytes"] - r["mha_saved_bytes"]) / r["btd_bytes"]:.2f}']
        out.append([r['device'], r['dtype'], shape_text(r), r['attention'], r['mode'], f'{r["layer_ms"]:.3f}', f'{r["mha_ms"]:.3f}',
                    f'{r["floor_ms"]:.3f}', f'{r["layer_vs_floor"]:.3f}', _quartiles(r), f'{r["layer_vs_mha"]:.3f}',
                    f'{r["mha_vs_floor"]:.3f}', *saved])
    return out


def table(rows):
    "The results as a fixed-width text table."
    return text_table(HEAD, cells(rows))


def markdown_table(rows):
    "The results as a Markdown table (times in ms, saved bytes in MiB)."
    return markdown(HEAD, cells(rows), left=5)


def _quartiles(row):
    "The middle half of the rounds' ratios of the layer to the floor, `q1-q3` (absent from runs stored before it was kept)."
    q = row.get('layer_vs_floor_quartiles')
    return quartiles_text(q) if q else ''


def summary(rows):
    "Closing lines: the worst ratios, against the issue's goals."
    lines = []
    self_rows = [r for r in rows if r['attention'] == 'self']
    cross_rows = [r for r in rows if r['attention'] == 'cross']
    if cross_rows:
        w = max(cross_rows, key=lambda r: r['layer_vs_mha'])
        lines.append(f'worst cross-attention ratio to bare MHA: {w["layer_vs_mha"]:.3f} ({w["device"]}, T={w["T"]}, {w["mode"]})')
    saved = [r for r in rows if 'layer_saved_bytes' in r]
    if saved:
        w = max(saved, key=lambda r: (r['layer_saved_bytes'] - r['mha_saved_bytes']) / r['btd_bytes'])
        lines.append(f'most saved for backward beyond bare MHA: {(w["layer_saved_bytes"] - w["mha_saved_bytes"]) / w["btd_bytes"]:.2f} '
                     f'(B, T, D) tensors ({w["device"]}, T={w["T"]}, {w["attention"]})')
    w = max(self_rows or rows, key=lambda r: r['layer_vs_floor'])
    spread = f', middle half of the rounds {_quartiles(w)}' if _quartiles(w) else ''
    lines.append(f'worst {"self-attention " if self_rows else ""}ratio to the floor: {w["layer_vs_floor"]:.3f} '
                 f'({w["device"]}, (B, T, D, H)={shape_text(w)}, {w["mode"]}{spread})')
    return '\n'.join(lines)


def figure(rows):
    "Ratio of the layer to the floor against T, one line per device, attention kind and mode; a matplotlib `Figure`."
    from matplotlib.figure import Figure  # no pyplot: works headless and in notebooks alike
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for device in sorted({r['device'] for r in rows}):
        for attention in ('self', 'cross'):
            for mode, style in (('forward', '-'), ('forward+backward', '--')):
                sel = sorted((r for r in rows if (r['device'], r['attention'], r['mode']) == (device, attention, mode)), key=lambda r: r['T'])
                if not sel: continue
                line, = ax.plot([r['T'] for r in sel], [r['layer_vs_floor'] for r in sel], style, marker='o' if attention == 'self' else 's',
                                label=f'{device} {attention}-attention, {mode}')
                spread = [r for r in sel if r.get('layer_vs_floor_quartiles')]  # the middle half of the rounds, as a bar
                if spread:
                    ax.vlines([r['T'] for r in spread], [r['layer_vs_floor_quartiles'][0] for r in spread],
                              [r['layer_vs_floor_quartiles'][1] for r in spread], color=line.get_color(), alpha=0.5)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.axhline(1.02, color='grey', linewidth=0.8, linestyle=':', label='goal for self-attention: 1.02')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('sequence length T (each T has its own B, D, H: see the table)')
    ax.set_ylabel('layer time / floor time (bars: middle half of rounds)')
    ax.set_title('What positions cost: AdditivePosMultiheadAttention / attention without positions', fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(rows, path):
    "Write `figure(rows)` to `path`."
    figure(rows).savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(p, quick_help='fewer, shorter rounds: a smoke run under two minutes')
    p.add_argument('--device', choices=['all', 'cpu', 'cuda'], default='all', help='where to run (default: cpu, and cuda when present)')
    p.add_argument('--plot', metavar='PATH', help='write a plot of the ratio to the floor against T to PATH')
    args = p.parse_args(argv)
    results = run(args)
    print(header(results['meta']))
    print(table(results['rows']))
    if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot: plot(results['rows'], args.plot)
    print(summary(results['rows']))
    return results


if __name__ == '__main__':
    main()
