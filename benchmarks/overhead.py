"""What the positions cost: `AdditivePosMultiheadAttention` against the attention it wraps.

    python benchmarks/overhead.py                 # full run, a few minutes on a laptop CPU
    python benchmarks/overhead.py --quick         # smoke run, under two minutes
    python benchmarks/overhead.py --json benchmarks/results.json --plot benchmarks/overhead.png

Three implementations run on the same inputs with the same weights (the layer's own `attn`):

- `layer`: `AdditivePosMultiheadAttention` as imported, with a random table and default positions;
- `cached` (self-attention, eval forward only): the same layer with `eval_cache=True`, served from its kept
  projected table;
- `mha`: bare `nn.MultiheadAttention(x, x, x)` (cross-attention: `(x, mem, mem)`), i.e. `layer.attn` alone;
- `floor`: the same weights as one packed input projection (`(x, mem)`: a query projection and a packed
  key/value projection), `F.scaled_dot_product_attention` and the output projection, with no positions.

The floor of a case is the faster of `mha` and `floor`: the cheapest way we know to compute the same
attention without positions. Cases: self- and cross-attention (memory as long as the query), forward in eval
mode under `no_grad`, and forward plus backward in train mode (inputs require grad, the output's gradient is a
fixed tensor of ones, parameter gradients accumulate as in training).

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
import argparse, ctypes, ctypes.util, json, os, platform, statistics, sys, time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from additive_pos_attn.additive import AdditivePosMultiheadAttention

CPU_SHAPES = [(32, 64, 128, 4), (8, 128, 256, 8), (8, 512, 256, 8), (2, 1024, 512, 8)]  # (B, T, D, H)
CUDA_SHAPES = [(16, 2048, 1024, 16)]
IMPLEMENTATIONS = ('layer', 'mha', 'floor')


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def floor_attention(attn: torch.nn.MultiheadAttention, query, key, value):
    "Attention without positions at its cheapest: packed in-projection, SDPA, out-projection (no masks, no dropout)."
    B, Tq, D = query.shape
    H = attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    # Heads are split with `unbind(2)` and then transposed: the backward then stacks the heads' gradients straight
    # into the projection's (B, T, 3, H, D/H) layout; `permute(2, 0, 3, 1, 4).unbind(0)` costs one more strided copy.
    if query is key and key is value:
        q, k, v = (t.transpose(1, 2) for t in F.linear(query, w, b).view(B, Tq, 3, H, D // H).unbind(2))
    else:  # cross-attention, key is value: one projection for the query, a packed one for key and value
        wq, wkv = w.split([D, 2 * D])
        bq, bkv = (None, None) if b is None else b.split([D, 2 * D])
        q = F.linear(query, wq, bq).view(B, Tq, H, D // H).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in F.linear(key, wkv, bkv).view(B, key.shape[1], 2, H, D // H).unbind(2))
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return F.linear(out.transpose(1, 2).reshape(B, Tq, D), attn.out_proj.weight, attn.out_proj.bias)


def make_layer(D, H, T, device, dtype, seed=0):
    torch.manual_seed(seed)
    layer = AdditivePosMultiheadAttention(D, H, max_len=2 * T, device=device, dtype=dtype)
    with torch.no_grad(): layer.pos_emb.normal_(std=0.02)  # a trained-looking table; its values do not change the cost
    return layer


def _cache(layer, on, fn):
    "`fn` run with the layer's `eval_cache` set to `on` (the same layer, so the same weights)."
    def run():
        layer.eval_cache = on
        return fn()
    return run


def implementations(layer, x, mem, cached=False):
    "The callables of a case (with `cached`, also the layer with `eval_cache=True`), each returning the output tensor."
    kv = x if mem is None else mem
    return {'layer': _cache(layer, False, lambda: layer(x, kv, kv)[0]),
            **({'cached': _cache(layer, True, lambda: layer(x, kv, kv)[0])} if cached else {}),
            'mha': lambda: layer.attn(x, kv, kv, need_weights=False)[0],
            'floor': lambda: floor_attention(layer.attn, x, kv, kv)}


def make_case(shape, attention, mode, device, dtype):
    "Build the layer, inputs and the timed statements of one case; returns (layer, inputs, {name: stmt})."
    B, T, D, H = shape
    layer = make_layer(D, H, T, device, dtype)
    g = torch.Generator(device='cpu').manual_seed(1)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    mem = None if attention == 'self' else torch.randn(B, T, D, generator=g).to(device, dtype)
    if mode == 'forward':
        layer.eval()
        def timed(f):
            def run():
                with torch.no_grad(): f()
            return run
    else:
        layer.train()
        x.requires_grad_(True)
        if mem is not None: mem.requires_grad_(True)
        grad = torch.ones(B, T, D, device=device, dtype=dtype)
        def timed(f):
            def run(): f().backward(grad)
            return run
    fns = implementations(layer, x, mem, cached=mode == 'forward' and attention == 'self')
    return layer, (x, mem), {name: timed(f) for name, f in fns.items()}


def saved_bytes(layer, x, mem, fn):
    "Bytes autograd saves for backward in one call of `fn`: distinct non-parameter storages, each counted once."
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params: seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def time_case(stmts, *, rounds, min_run_time, num_threads, timer=time.perf_counter):
    """Interleaved rounds of timing; returns {name: (median_seconds, iqr_seconds, n_blocks, [seconds per call, by round])}.

    The first round is `blocked_autorange` (which also picks how many calls make a block); later rounds time
    blocks of that many calls for about `min_run_time` each. The order of the implementations rotates each round."""
    names = list(stmts)
    for f in stmts.values(): f()  # warm-up: allocator, kernels, lazy init
    timers = {n: benchmark.Timer(stmt='f()', globals={'f': stmts[n]}, num_threads=num_threads, label=n, timer=timer) for n in names}
    measurements, by_round, number, per_block = {n: [] for n in names}, {n: [] for n in names}, {}, {}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if r == 0:
                m = timers[n].blocked_autorange(min_run_time=min_run_time)
                number[n], per_block[n] = m.number_per_run, m.median * m.number_per_run
                measurements[n].append(m)
                by_round[n].append(m.median)
            else:
                ms = [timers[n].timeit(number[n]) for _ in range(max(1, round(min_run_time / per_block[n])))]
                measurements[n] += ms
                by_round[n].append(statistics.median(m.median for m in ms))
    out = {}
    for n, ms in measurements.items():
        m = benchmark.Measurement.merge(ms)[0]
        out[n] = (m.median, m.iqr, len(m.times), by_round[n])
    return out


def paired_ratio(times, a, b):
    "The median over rounds of the ratio of `a`'s time to `b`'s in the same round."
    return statistics.median(x / y for x, y in zip(times[a][3], times[b][3]))


def paired_quartiles(times, a, b):
    "The first and third quartiles over rounds of the same ratios: the middle half of the rounds, how much they agree."
    ratios = [x / y for x, y in zip(times[a][3], times[b][3])]
    if len(ratios) < 2: return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method='inclusive')
    return [q1, q3]


def steady_malloc() -> str:
    "Fix glibc's malloc thresholds (see the module docstring); returns what was done, for the record."
    try: libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError: return 'system (no C library found)'
    if not hasattr(libc, 'mallopt') or platform.libc_ver()[0] != 'glibc': return 'system (not glibc)'
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return 'steady (glibc mallopt: mmap threshold 32 MiB, no trimming)' if ok else 'system (mallopt refused)'


def clock(device, kind):
    "The timer: wall time, after waiting for the GPU when there is one in play; or this process's CPU time."
    if device == 'cuda':
        def synchronized():
            torch.cuda.synchronize()
            return time.perf_counter()
        return synchronized
    return time.process_time if kind == 'process' else time.perf_counter


def run(args):
    devices = ['cpu', 'cuda'] if args.device == 'all' else [args.device]
    if 'cuda' in devices and not torch.cuda.is_available():
        if args.device == 'cuda': raise SystemExit('--device cuda: CUDA is not available')
        devices.remove('cuda')
    if args.timer == 'process' and 'cuda' in devices: raise SystemExit('--timer process measures CPU time: use it with --device cpu')
    malloc = steady_malloc() if args.malloc == 'steady' else 'system'
    log(f'allocator: {malloc}')
    num_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(num_threads)
    rounds, min_run_time = (3, 0.05) if args.quick else (args.rounds, args.min_run_time)
    plan = []
    for device in devices:
        shapes, dtype = (CPU_SHAPES, torch.float32) if device == 'cpu' else (CUDA_SHAPES, torch.bfloat16)
        if args.shapes: shapes = [shapes[i] for i in args.shapes]
        for shape in shapes:
            for attention in ('self', 'cross'):
                for mode in ('forward', 'forward+backward'):
                    plan.append((device, dtype, shape, attention, mode))
    rows, start = [], time.perf_counter()
    for i, (device, dtype, shape, attention, mode) in enumerate(plan):
        log(f'[{i + 1}/{len(plan)}] {device} {str(dtype).replace("torch.", "")} (B, T, D, H)={shape} {attention} {mode} '
            f'({time.perf_counter() - start:.0f}s)')
        layer, (x, mem), stmts = make_case(shape, attention, mode, device, dtype)
        times = time_case(stmts, rounds=rounds, min_run_time=min_run_time, num_threads=num_threads, timer=clock(device, args.timer))
        row = dict(device=device, dtype=str(dtype).replace('torch.', ''), B=shape[0], T=shape[1], D=shape[2], H=shape[3],
                   attention=attention, mode=mode, **{f'{n}_ms': times[n][0] * 1e3 for n in IMPLEMENTATIONS},
                   **{f'{n}_iqr_ms': times[n][1] * 1e3 for n in IMPLEMENTATIONS},
                   blocks=min(t[2] for t in times.values()))
        row['floor_ms_min'] = min(row['mha_ms'], row['floor_ms'])
        best = 'mha' if row['mha_ms'] < row['floor_ms'] else 'floor'  # the floor of the case: the faster by median
        row['layer_vs_floor'] = paired_ratio(times, 'layer', best)
        row['layer_vs_floor_quartiles'] = paired_quartiles(times, 'layer', best)
        row['layer_vs_mha'] = paired_ratio(times, 'layer', 'mha')
        row['mha_vs_floor'] = paired_ratio(times, 'mha', best)
        row['rounds'] = rounds
        if 'cached' in times:
            row['cached_ms'] = times['cached'][0] * 1e3
            row['cached_vs_floor'] = paired_ratio(times, 'cached', best)
        if mode == 'forward+backward':
            fns = implementations(layer, x, mem)
            for n in IMPLEMENTATIONS: row[f'{n}_saved_bytes'] = saved_bytes(layer, x, mem, fns[n])
            row['btd_bytes'] = shape[0] * shape[1] * shape[2] * x.element_size()
        rows.append(row)
        del layer, x, mem, stmts
    log(f'done in {time.perf_counter() - start:.0f}s')
    return dict(meta={**machine(num_threads, args), 'malloc': malloc}, rows=rows)


def machine(num_threads, args):
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
        if names: cpu = names[0]
    except OSError: pass
    meta = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), cpu=cpu, cores=os.cpu_count(), threads=num_threads,
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                command=' '.join(['python benchmarks/overhead.py'] + (argv_of(args))), timer=args.timer,
                quick=args.quick)
    if torch.cuda.is_available(): meta['gpu'] = torch.cuda.get_device_name()
    return meta


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


def table(rows):
    "The results as a fixed-width text table."
    head = (f'{"device":6} {"dtype":8} {"(B, T, D, H)":>20} {"attention":9} {"mode":16} {"layer ms":>9} {"mha ms":>9} '
            f'{"floor ms":>9} {"layer/floor":>11} {"middle half":>13} {"layer/mha":>9} {"mha/floor":>9} {"cached/floor":>12} {"saved MiB layer":>15} {"mha":>7} '
            f'{"extra (BTD)":>11}')
    lines = [head, '-' * len(head)]
    for r in rows:
        shape = f'({r["B"]}, {r["T"]}, {r["D"]}, {r["H"]})'
        saved = ''
        if 'layer_saved_bytes' in r:
            extra = (r['layer_saved_bytes'] - r['mha_saved_bytes']) / r['btd_bytes']
            saved = f'{r["layer_saved_bytes"] / 2**20:15.2f} {r["mha_saved_bytes"] / 2**20:7.2f} {extra:11.2f}'
        lines.append(f'{r["device"]:6} {r["dtype"]:8} {shape:>20} {r["attention"]:9} {r["mode"]:16} {r["layer_ms"]:9.3f} '
                     f'{r["mha_ms"]:9.3f} {r["floor_ms"]:9.3f} {r["layer_vs_floor"]:11.3f} {_quartiles(r):>13} {r["layer_vs_mha"]:9.3f} '
                     f'{r["mha_vs_floor"]:9.3f} {_cached(r):>12} {saved}')
    return '\n'.join(lines)


def _quartiles(row):
    "The middle half of the rounds' ratios of the layer to the floor, `q1-q3` (absent from runs stored before it was kept)."
    q = row.get('layer_vs_floor_quartiles')
    return f'{q[0]:.3f}-{q[1]:.3f}' if q else ''


def _cached(row):
    "The ratio of the layer with `eval_cache=True` to the floor, for self-attention's eval forward."
    return f'{row["cached_vs_floor"]:.3f}' if 'cached_vs_floor' in row and row['attention'] == 'self' else ''


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
    cached = [r for r in self_rows if 'cached_vs_floor' in r]
    if cached:
        w = max(cached, key=lambda r: r['cached_vs_floor'])
        lines.append(f'worst self-attention eval forward with eval_cache=True, ratio to the floor: {w["cached_vs_floor"]:.3f} '
                     f'({w["device"]}, (B, T, D, H)=({w["B"]}, {w["T"]}, {w["D"]}, {w["H"]}))')
    w = max(self_rows or rows, key=lambda r: r['layer_vs_floor'])
    spread = f', middle half of the rounds {_quartiles(w)}' if _quartiles(w) else ''
    lines.append(f'worst {"self-attention " if self_rows else ""}ratio to the floor: {w["layer_vs_floor"]:.3f} '
                 f'({w["device"]}, (B, T, D, H)=({w["B"]}, {w["T"]}, {w["D"]}, {w["H"]}), {w["mode"]}{spread})')
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
                if attention == 'self' and all('cached_vs_floor' in r for r in sel):
                    ax.plot([r['T'] for r in sel], [r['cached_vs_floor'] for r in sel], ':', marker='^',
                            label=f'{device} self-attention, {mode}, eval_cache=True')
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


def markdown_table(rows):
    "The results as a Markdown table (times in ms, saved bytes in MiB)."
    head = ['device', 'dtype', '(B, T, D, H)', 'attention', 'mode', 'layer ms', 'MHA ms', 'floor ms', 'layer / floor',
            'middle half of rounds', 'layer / MHA',
            'MHA / floor', 'cached / floor', 'saved MiB: layer', 'MHA', 'extra (B, T, D)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * 5 + ['--:'] * (len(head) - 5)) + '|']
    for r in rows:
        saved = ['', '', '']
        if 'layer_saved_bytes' in r:
            saved = [f'{r["layer_saved_bytes"] / 2**20:.2f}', f'{r["mha_saved_bytes"] / 2**20:.2f}',
                     f'{(r["layer_saved_bytes"] - r["mha_saved_bytes"]) / r["btd_bytes"]:.2f}']
        cells = [r['device'], r['dtype'], f'({r["B"]}, {r["T"]}, {r["D"]}, {r["H"]})', r['attention'], r['mode'],
                 f'{r["layer_ms"]:.3f}', f'{r["mha_ms"]:.3f}', f'{r["floor_ms"]:.3f}', f'{r["layer_vs_floor"]:.3f}',
                 _quartiles(r), f'{r["layer_vs_mha"]:.3f}', f'{r["mha_vs_floor"]:.3f}', _cached(r), *saved]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='fewer, shorter rounds: a smoke run under two minutes')
    p.add_argument('--device', choices=['all', 'cpu', 'cuda'], default='all', help='where to run (default: cpu, and cuda when present)')
    p.add_argument('--rounds', type=int, default=15, help='interleaved rounds per case (default 15; --quick: 3)')
    p.add_argument('--min-run-time', type=float, default=0.1, help='seconds per implementation per round (default 0.1; --quick: 0.05)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (default: torch.get_num_threads())')
    p.add_argument('--timer', choices=['wall', 'process'], default='wall',
                   help="'process' times CPU time of this process instead of wall time: steadier on a busy machine "
                        "with --threads 1 (CPU only; it also counts the time threads spend spinning)")
    p.add_argument('--malloc', choices=['steady', 'system'], default='steady',
                   help="'steady' (default) fixes glibc's malloc thresholds so that page faults do not land on one "
                        "implementation by chance; 'system' leaves the allocator as it is")
    p.add_argument('--shapes', type=int, nargs='*', help='indices into the shape list, to run a subset')
    p.add_argument('--json', metavar='PATH', help='write the results and a description of the machine to PATH')
    p.add_argument('--plot', metavar='PATH', help='write a plot of the ratio to the floor against T to PATH')
    args = p.parse_args(argv)
    results = run(args)
    m = results['meta']
    print(f'# {m["command"]}  |  {m["date"]}  |  {m["cpu"]}, {m["cores"]} cores, {m["threads"]} threads'
          f'{"  |  " + m["gpu"] if "gpu" in m else ""}  |  torch {m["torch"]}  |  malloc {m["malloc"]}')
    print(table(results['rows']))
    if args.json:
        with open(args.json, 'w') as f: json.dump(results, f, indent=1)
    if args.plot: plot(results['rows'], args.plot)
    print(summary(results['rows']))
    return results


if __name__ == '__main__':
    main()
