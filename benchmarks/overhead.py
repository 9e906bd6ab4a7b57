"""What the positions cost: each of the package's layers against the attention it wraps.

    python benchmarks/overhead.py                 # full run, every layer the package defines
    python benchmarks/overhead.py --quick         # smoke run (two short rounds a case), about a minute
    python benchmarks/overhead.py --layers additive relative --json benchmarks/results.json --plot benchmarks/overhead.png
    python benchmarks/overhead.py --compiled --threads 1 --timer process --json benchmarks/compiled.json   # compiled (issue 15)
    python benchmarks/overhead.py --compiled --quick   # compiled smoke run: the smallest shape only, about a minute

The layers (`--layers`, by default every one of them the package defines: the rotary layer is skipped, with a
line that says why, where `additive_pos_attn.rotary` cannot be imported), each built as `harness.LAYERS` says:

- `additive`: `AdditivePosMultiheadAttention`, `max_len=2T`, a random table (std 0.02);
- `relative`: `AdditiveRelMultiheadAttention`, `max_distance=128` (T5's: the clip is exercised at T of 512 and
  1024 and not at 64 and 128; the bias gathered per call is `(H, T_q, T_k)` whatever the clip), a random table
  (`rel_bias.normal_()`);
- `rotary`: `RoPEMultiheadAttention` with its default options.

Every layer runs with default positions. In each case the layers and two baselines run on the same inputs
with the same weights (every layer's `attn` holds the first layer's weights), in the same interleaved rounds:

- `mha`: bare `nn.MultiheadAttention(x, x, x)` (cross-attention: `(x, mem, mem)`), i.e. a layer's `attn` alone;
- `floor`: the same weights as one packed input projection (`(x, mem)`: a query projection and a packed
  key/value projection), `F.scaled_dot_product_attention` and the output projection, with no positions.

The floor of a case is the faster of `mha` and `floor`: the cheapest way we know to compute the same
attention without positions; every layer of the case is judged against that one floor. Cases: self- and
cross-attention (memory as long as the query), forward in eval mode under `no_grad`, and forward plus backward
in train mode (inputs require grad, the output's gradient is a fixed tensor of ones, parameter gradients
accumulate as in training). The results have one row per case and layer (`layer`; a row without it, from a
run stored before there were several layers, is the additive layer's).

The goal (issue 13): every layer at most 1.10 times the floor at every CPU shape, and at most 1.05 at T of 512
and more, self- and cross-attention, forward and forward plus backward (`GOAL`, `goal`; the summary lists the
cases that miss it).

`--compiled` (issue 15) times `torch.compile`d code instead, in the same shapes, cases and paired rounds: each
layer compiled whole (`torch.compile(layer, fullgraph=True, dynamic=False)`, inductor, the default backend)
against the floor compiled with the same settings (`floor_attention` and bare MHA, each compiled; the faster is
the compiled floor), beside the eager floor (for what compiling gains). Besides default positions it times the
layers of `--explicit` (default: the additive layer) with explicit per-sample positions, `(B, T)` tensors, each
sample's `arange(T)` shifted by its own offset (`explicit_positions`). Compilation happens at the first call: every
case starts from `torch._dynamo.reset()`, so that each shape gets a graph of its own (static shapes: no graph
compiled for one shape serves another, and no graph is made dynamic by a second shape), and each compiled
callable is called twice before the clock starts (the first call compiles the forward and, in training, the
backward; its time is kept as `layer_compile_s`, `mha_compile_s`, `floor_compile_s`: compilation, from inductor's
on-disk cache where warm, and one call). Its output is then checked against the eager one, and the timing
runs under `torch._dynamo.config.error_on_recompile`, so that a recompile during timing fails the run instead of
being timed. The goal: every compiled layer at most 1.03 times the compiled floor (`GOAL_COMPILED`). Saved bytes
are not counted for compiled code (AOT autograd decides what it saves).

The harness (timing, floor, saved bytes, the layers' options) is `benchmarks/harness.py`, shared with `paths.py`
(which fast paths earn their place) and `compare.py` (a git revision of the layer against the working tree's).

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
import argparse, importlib, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (CPU_SHAPES, LAYERS, MODES, add_timing_args, baselines, clock, floor_attention, floor_of, header, layer_call, log, machine,
                     make_inputs, make_layer, markdown, paired_quartiles, paired_ratio, progress, quartiles_text, saved_bytes,
                     setup, shape_text, text_table, time_case, timed)

PACKAGE = 'additive_pos_attn'
CUDA_SHAPES = [(16, 2048, 1024, 16)]
BASELINES = ('mha', 'floor')
GOAL, GOAL_LONG, LONG = 1.10, 1.05, 512  # issue 13: at most 1.10 times the floor at every shape, 1.05 at T of 512 and more
GOAL_COMPILED = 1.03  # issue 15: a compiled layer at most 1.03 times the compiled floor, every shape and case


def goal(T):
    "The most a layer may cost, as a multiple of the floor, at sequence length `T`."
    return GOAL_LONG if T >= LONG else GOAL


def layer_of(row):
    "The layer of a results row (rows stored before there were several layers are the additive layer's)."
    return row.get('layer', 'additive')


def layer_classes(names=None):
    """The classes of the layers `names` from the package, by name. By default every layer of `LAYERS`
    the package defines: one it cannot import (yet) is left out, with a line that says why."""
    classes = {}
    for name in names or LAYERS:
        spec = LAYERS[name]
        try: classes[name] = getattr(importlib.import_module(f'{PACKAGE}.{spec.module}'), spec.cls)
        except Exception as e:
            if names: raise
            log(f'layer {name!r} left out: {PACKAGE}.{spec.module}.{spec.cls} does not import ({type(e).__name__}: {e})')
    return classes


def first(layers):
    "The first layer of a case: its `attn` serves bare MHA and the floor."
    return next(iter(layers.values()))


def make_layers(classes, shape, device='cpu', dtype=torch.float32):
    "The layers of `classes` for `shape`, seeded, their tables random and every `attn` holding the first layer's weights."
    layers = {name: make_layer(cls, shape, device, dtype, spec=LAYERS[name]) for name, cls in classes.items()}
    weights = first(layers).attn.state_dict()
    for layer in layers.values(): layer.attn.load_state_dict(weights)
    return layers


def implementations(layers, x, mem):
    "The callables of a case, each returning the output tensor: every layer, bare MHA and the floor, on the same weights."
    return {**{name: layer_call(layer, x, mem) for name, layer in layers.items()}, **baselines(first(layers).attn, x, mem)}


def make_case(classes, shape, attention, mode, device, dtype):
    "Build the layers, inputs and the timed statements of one case; returns (layers, inputs, {name: stmt})."
    layers = {name: layer.train(mode != 'forward') for name, layer in make_layers(classes, shape, device, dtype).items()}
    x, mem, grad = make_inputs(shape, attention, mode, device, dtype)
    return layers, (x, mem), timed(implementations(layers, x, mem), grad)


def case_rows(layers, x, mem, times, common):
    "The rows of one timed case, one a layer: times, paired ratios to the floor and to bare MHA, saved bytes in training."
    floor = floor_of(times)  # the floor of the case: the faster by median
    common = dict(common, **{f'{n}_ms': times[n][0] * 1e3 for n in BASELINES}, **{f'{n}_iqr_ms': times[n][1] * 1e3 for n in BASELINES},
                  blocks=min(t[2] for t in times.values()), mha_vs_floor=paired_ratio(times, 'mha', floor))
    common['floor_ms_min'] = min(common['mha_ms'], common['floor_ms'])
    saved = {}
    if common['mode'] == 'forward+backward':
        fns = implementations(layers, x, mem)
        saved = {n: saved_bytes(layers.get(n, first(layers)), fns[n]) for n in [*layers, 'mha']}
    rows = []
    for name in layers:
        row = dict(layer=name, **common, layer_ms=times[name][0] * 1e3, layer_iqr_ms=times[name][1] * 1e3,
                   layer_vs_floor=paired_ratio(times, name, floor), layer_vs_floor_quartiles=paired_quartiles(times, name, floor),
                   layer_vs_mha=paired_ratio(times, name, 'mha'), layer_vs_mha_quartiles=paired_quartiles(times, name, 'mha'))
        if saved: row.update(layer_saved_bytes=saved[name], mha_saved_bytes=saved['mha'], btd_bytes=x.numel() * x.element_size())
        rows.append(row)
    return rows


def run(args):
    devices = ['cpu', 'cuda'] if args.device == 'all' else [args.device]
    if 'cuda' in devices and not torch.cuda.is_available():
        if args.device == 'cuda': raise SystemExit('--device cuda: CUDA is not available')
        devices.remove('cuda')
    if args.timer == 'process' and 'cuda' in devices: raise SystemExit('--timer process measures CPU time: use it with --device cpu')
    classes = layer_classes(args.layers)
    if not classes: raise SystemExit('no layer to time')
    opts = setup(args)
    plan = []
    for device in devices:
        shapes, dtype = (CPU_SHAPES, torch.float32) if device == 'cpu' else (CUDA_SHAPES, torch.bfloat16)
        if args.shapes: shapes = [shapes[i] for i in args.shapes]
        elif args.compiled and args.quick: shapes = shapes[:1]  # compiling is slow: the smoke run compiles the smallest shape only
        plan += [(device, dtype, shape, attention, mode) for shape in shapes for attention in ('self', 'cross') for mode in MODES]
    if args.compiled: return run_compiled(args, classes, opts, plan)
    rows = []
    for device, dtype, shape, attention, mode in progress(plan, describe_case):
        layers, (x, mem), stmts = make_case(classes, shape, attention, mode, device, dtype)
        times = time_case(stmts, rounds=opts['rounds'], min_run_time=opts['min_run_time'], num_threads=opts['num_threads'],
                          timer=clock(device, args.timer))
        common = dict(device=device, dtype=str(dtype).replace('torch.', ''), B=shape[0], T=shape[1], D=shape[2], H=shape[3],
                      attention=attention, mode=mode, rounds=opts['rounds'])
        rows += case_rows(layers, x, mem, times, common)
        del layers, x, mem, stmts
    command = ' '.join(['python benchmarks/overhead.py'] + argv_of(args))
    meta = dict(machine(opts['num_threads'], command, args.timer, args.quick), malloc=opts['malloc'], layers=list(classes))
    return dict(meta=meta, rows=rows)


def describe_case(case):
    "A case of the plan, for the progress lines."
    device, dtype, shape, attention, mode = case
    return f'{device} {str(dtype).replace("torch.", "")} (B, T, D, H)={shape} {attention} {mode}'


def argv_of(args):
    "The options that change what is measured, to print the command that reproduces a run."
    out = ['--quick'] if args.quick else []
    if args.compiled: out += ['--compiled'] + (['--explicit', *args.explicit] if args.explicit != ['additive'] else [])
    if args.device != 'all': out += ['--device', args.device]
    if args.layers: out += ['--layers', *args.layers]
    if args.threads: out += ['--threads', str(args.threads)]
    if args.timer != 'wall': out += ['--timer', args.timer]
    if args.malloc != 'steady': out += ['--malloc', args.malloc]
    if not args.quick and (args.rounds, args.min_run_time) != (15, 0.1): out += ['--rounds', str(args.rounds), '--min-run-time', str(args.min_run_time)]
    if args.shapes: out += ['--shapes'] + [str(i) for i in args.shapes]
    return out


def extra_btd(row):
    "What the layer saves for backward beyond bare MHA, in `(B, T, D)` tensors (None for rows without saved bytes)."
    return (row['layer_saved_bytes'] - row['mha_saved_bytes']) / row['btd_bytes'] if 'layer_saved_bytes' in row else None


HEAD = ['layer', 'device', 'dtype', '(B, T, D, H)', 'attention', 'mode', 'layer ms', 'MHA ms', 'floor ms', 'layer / floor',
        'middle half of rounds', 'layer / MHA', 'MHA / floor', 'saved MiB: layer', 'MHA', 'extra (B, T, D)']


def cells(rows):
    "One row of cells per case and layer (times in ms, saved bytes in MiB)."
    out = []
    for r in rows:
        saved = ['', '', '']
        if 'layer_saved_bytes' in r:
            saved = [f'{r["layer_saved_bytes"] / 2**20:.2f}', f'{r["mha_saved_bytes"] / 2**20:.2f}', f'{extra_btd(r):.2f}']
        out.append([layer_of(r), r['device'], r['dtype'], shape_text(r), r['attention'], r['mode'], f'{r["layer_ms"]:.3f}',
                    f'{r["mha_ms"]:.3f}', f'{r["floor_ms"]:.3f}', f'{r["layer_vs_floor"]:.3f}', _quartiles(r),
                    f'{r["layer_vs_mha"]:.3f}', f'{r["mha_vs_floor"]:.3f}', *saved])
    return out


def table(rows):
    "The results as a fixed-width text table."
    return text_table(HEAD, cells(rows))


def markdown_table(rows):
    "The results as a Markdown table (times in ms, saved bytes in MiB)."
    return markdown(HEAD, cells(rows), left=6)


def _quartiles(row):
    "The middle half of the rounds' ratios of the layer to the floor, `q1-q3` (absent from runs stored before it was kept)."
    q = row.get('layer_vs_floor_quartiles')
    return quartiles_text(q) if q else ''


def layers_of(rows):
    "The layers of `rows`, in the order of `LAYERS`."
    present = {layer_of(r) for r in rows}
    return [name for name in LAYERS if name in present]


def _cases(rows):
    "The rows by (layer, device, shape), in the order they ran, and within one each (attention, mode) at most once."
    out = {}
    for r in rows: out.setdefault((layer_of(r), r['device'], shape_text(r), r['T']), {})[r['attention'], r['mode']] = r
    return sorted(out.items(), key=lambda kv: list(LAYERS).index(kv[0][0]))


GRID_HEAD = ['layer', 'device', '(B, T, D, H)', 'goal', 'self fwd', 'self fwd+bwd', 'cross fwd', 'cross fwd+bwd',
             'cross / MHA fwd', 'cross / MHA fwd+bwd', 'extra saved: self', 'cross', 'goal met']
KINDS = [(attention, mode) for attention in ('self', 'cross') for mode in MODES]


def grid_cells(rows):
    """One row of cells per layer and shape: the ratios to the floor (self, cross; forward, forward plus backward),
    cross-attention's ratios to bare MHA, the `(B, T, D)` tensors saved beyond bare MHA, and whether the goal is met."""
    out = []
    for (name, device, shape, T), sel in _cases(rows):
        ratio = lambda key, kind: f'{sel[kind][key]:.3f}' if kind in sel else ''
        extra = lambda attention: f'{extra_btd(sel[attention, MODES[1]]):.2f}' if (attention, MODES[1]) in sel else ''
        met = all(r['layer_vs_floor'] <= goal(T) for r in sel.values())
        out.append([name, device, shape, f'{goal(T):.2f}', *[ratio('layer_vs_floor', k) for k in KINDS],
                    *[ratio('layer_vs_mha', ('cross', m)) for m in MODES], extra('self'), extra('cross'), 'yes' if met else 'no'])
    return out


def grid(rows, as_markdown=False):
    "Ratios to the floor per layer and shape, against the goal (a text table, or Markdown)."
    return markdown(GRID_HEAD, grid_cells(rows), left=3) if as_markdown else text_table(GRID_HEAD, grid_cells(rows))


def misses(rows):
    "The CPU rows whose layer costs more than the goal allows."
    return [r for r in rows if r['device'] == 'cpu' and r['layer_vs_floor'] > goal(r['T'])]


def _where(r, *keys):
    return ', '.join([f'{r["device"]}', f'(B, T, D, H)={shape_text(r)}', *[str(r[k]) for k in keys]])


def summary(rows):
    "Closing lines per layer: the worst ratios and the most saved for backward, and the goal met or the cases that miss it."
    lines = []
    for name in layers_of(rows):
        sel = [r for r in rows if layer_of(r) == name]
        w = max(sel, key=lambda r: r['layer_vs_floor'])
        spread = f', middle half of the rounds {_quartiles(w)}' if _quartiles(w) else ''
        lines.append(f'{name}: worst ratio to the floor {w["layer_vs_floor"]:.3f} ({_where(w, "attention", "mode")}{spread})')
        cross = [r for r in sel if r['attention'] == 'cross']
        if cross:
            w = max(cross, key=lambda r: r['layer_vs_mha'])
            lines.append(f'{name}: worst cross-attention ratio to bare MHA {w["layer_vs_mha"]:.3f} ({_where(w, "mode")})')
        saved = [r for r in sel if 'layer_saved_bytes' in r]
        if saved:
            w = max(saved, key=extra_btd)
            lines.append(f'{name}: most saved for backward beyond bare MHA {extra_btd(w):.2f} (B, T, D) tensors ({_where(w, "attention")})')
        cpu, bad = [r for r in sel if r['device'] == 'cpu'], misses(sel)
        verdict = (f'met at all {len(cpu)} CPU cases' if not bad else f'missed at {len(bad)} of {len(cpu)} CPU cases: ' +
                   '; '.join(f'T={r["T"]} {r["attention"]} {r["mode"]} {r["layer_vs_floor"]:.3f}' for r in bad))
        lines.append(f'{name}: goal (at most {GOAL:.2f} times the floor, {GOAL_LONG:.2f} from T={LONG}) {verdict}')
    return '\n'.join(lines)


def figure(rows):
    "Ratio to the floor against T, one panel per layer, one line per device, attention kind and mode; a matplotlib `Figure`."
    from matplotlib.figure import Figure  # no pyplot: works headless and in notebooks alike
    names = layers_of(rows)
    fig = Figure(figsize=(4.2 * len(names) + 0.6, 4.4))
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    lengths = sorted({r['T'] for r in rows})
    for ax, name in zip(axes, names):
        for device in sorted({r['device'] for r in rows}):
            for attention in ('self', 'cross'):
                for mode, style in (('forward', '-'), ('forward+backward', '--')):
                    sel = sorted((r for r in rows if (layer_of(r), r['device'], r['attention'], r['mode']) == (name, device, attention, mode)),
                                 key=lambda r: r['T'])
                    if not sel: continue
                    line, = ax.plot([r['T'] for r in sel], [r['layer_vs_floor'] for r in sel], style,
                                    marker='o' if attention == 'self' else 's', label=f'{device} {attention}-attention, {mode}')
                    spread = [r for r in sel if r.get('layer_vs_floor_quartiles')]  # the middle half of the rounds, as a bar
                    if spread:
                        ax.vlines([r['T'] for r in spread], [r['layer_vs_floor_quartiles'][0] for r in spread],
                                  [r['layer_vs_floor_quartiles'][1] for r in spread], color=line.get_color(), alpha=0.5)
        ax.axhline(1.0, color='black', linewidth=0.8)
        goal_x = [min(lengths[0], LONG) / 1.2, LONG, LONG, max(lengths[-1], LONG) * 1.2]
        ax.plot(goal_x, [GOAL, GOAL, GOAL_LONG, GOAL_LONG], ':', color='grey', label=f'goal: {GOAL:.2f}, {GOAL_LONG:.2f} from T={LONG}')
        ax.set_xscale('log', base=2)
        ax.set_xlabel('sequence length T (B, D, H: see the table)')
        ax.set_ylabel('layer time / floor time (bars: middle half of rounds)')
        ax.set_title(f'{name}: {LAYERS[name].cls}', fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle('What positions cost: each layer / attention without positions', fontsize=10)
    fig.tight_layout()
    return fig


def plot(rows, path):
    "Write `figure(rows)` to `path`."
    figure(rows).savefig(path, dpi=120)


# The compiled benchmark (`--compiled`, issue 15): each layer compiled against the floor compiled alike.

EXPLICIT = '+explicit'  # the suffix of a compiled implementation called with explicit positions


def explicit_positions(x, mem=None, seed=2):
    """Explicit per-sample positions for `x` (and `mem`): `(B, T)` integer tensors, each sample's `arange(T)` shifted
    by its own offset in `[0, T]` (under the additive layer's `max_len=2T`). Self-attention: one tensor for queries and
    keys (as a caller passes it); cross-attention: the memory's drawn apart. A dict of `q_positions` and `k_positions`."""
    B, T = x.shape[:2]
    g = torch.Generator(device='cpu').manual_seed(seed)
    draw = lambda length: (torch.randint(0, T + 1, (B, 1), generator=g) + torch.arange(length)).to(x.device)
    q = draw(T)
    return dict(q_positions=q, k_positions=q if mem is None else draw(mem.shape[1]))


def compile_fn(f):
    "`torch.compile` with the benchmark's settings, the same for the layers and the floor: default backend, one graph, static shapes."
    return torch.compile(f, fullgraph=True, dynamic=False)


def compiled_implementations(layers, x, mem, explicit=()):
    """The compiled callables of a case, each returning the output: every layer (default positions), the layers of
    `explicit` with `explicit_positions` (`'<layer>+explicit'`), bare MHA and the floor, each compiled by `compile_fn`;
    and the eager floor (`'eager_floor'`). Also the eager callables computing the same (for the check), by the same names."""
    kv = x if mem is None else mem
    attn = first(layers).attn
    positions = explicit_positions(x, mem)
    compiled, eager = {}, {}
    for name, layer in layers.items():
        c = compile_fn(layer)
        compiled[name], eager[name] = (lambda c=c: c(x, kv, kv)[0]), layer_call(layer, x, mem)
    for name in explicit:
        c = compile_fn(layers[name])
        compiled[name + EXPLICIT] = lambda c=c: c(x, kv, kv, **positions)[0]
        eager[name + EXPLICIT] = lambda layer=layers[name]: layer(x, kv, kv, **positions)[0]
    mha, floor = compile_fn(attn), compile_fn(floor_attention)
    compiled['mha'], compiled['floor'] = (lambda: mha(x, kv, kv, need_weights=False)[0]), (lambda: floor(attn, x, kv, kv))
    eager.update(baselines(attn, x, mem))
    compiled['eager_floor'] = eager['eager_floor'] = eager['floor']
    return compiled, eager


def warm_up(stmts, compiled, eager, grad):
    """Compile: call every statement twice (the first call compiles the forward and, in training, the backward),
    then check each compiled output against the eager one (float32: to 1e-4). Returns the first calls' seconds."""
    first_call = {}
    for name, stmt in stmts.items():
        start = time.perf_counter()
        stmt()
        first_call[name] = time.perf_counter() - start
        stmt()
    with torch.set_grad_enabled(grad is not None):  # the grad mode the graph was compiled for: no recompile
        for name in compiled:
            got, want = compiled[name]().detach(), eager[name]().detach()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: compiled output differs from eager: {m}')
    return first_call


def run_compiled(args, classes, opts, plan):
    "The compiled run (`--compiled`): one fresh compilation of every implementation per case, timed as `run` times eager code."
    import torch._dynamo
    explicit = [name for name in args.explicit if name in classes]
    rows = []
    for device, dtype, shape, attention, mode in progress(plan, describe_case):
        torch._dynamo.reset()  # a graph of its own for each case: no graph of another shape is reused or made dynamic
        layers = {name: layer.train(mode != 'forward') for name, layer in make_layers(classes, shape, device, dtype).items()}
        x, mem, grad = make_inputs(shape, attention, mode, device, dtype)
        compiled, eager = compiled_implementations(layers, x, mem, explicit)
        stmts = timed(compiled, grad)
        first_call = warm_up(stmts, compiled, eager, grad)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile while the clock runs fails the run
            times = time_case(stmts, rounds=opts['rounds'], min_run_time=opts['min_run_time'], num_threads=opts['num_threads'],
                              timer=clock(device, args.timer))
        floor = floor_of(times)  # the compiled floor: the faster of compiled MHA and the compiled floor
        common = dict(device=device, dtype=str(dtype).replace('torch.', ''), B=shape[0], T=shape[1], D=shape[2], H=shape[3],
                      attention=attention, mode=mode, rounds=opts['rounds'], compiled=True, floor=floor,
                      **{f'{n}_ms': times[n][0] * 1e3 for n in (*BASELINES, 'eager_floor')},
                      **{f'{n}_compile_s': first_call[n] for n in BASELINES},
                      blocks=min(t[2] for t in times.values()), mha_vs_floor=paired_ratio(times, 'mha', floor),
                      floor_vs_eager=paired_ratio(times, floor, 'eager_floor'),
                      floor_vs_eager_quartiles=paired_quartiles(times, floor, 'eager_floor'))
        for name in [n for n in compiled if n not in (*BASELINES, 'eager_floor')]:
            rows.append(dict(layer=name.removesuffix(EXPLICIT), positions='explicit' if name.endswith(EXPLICIT) else 'default', **common,
                             layer_ms=times[name][0] * 1e3, layer_iqr_ms=times[name][1] * 1e3, layer_compile_s=first_call[name],
                             layer_vs_floor=paired_ratio(times, name, floor), layer_vs_floor_quartiles=paired_quartiles(times, name, floor),
                             layer_vs_eager_floor=paired_ratio(times, name, 'eager_floor')))
        del layers, x, mem, stmts, compiled, eager
    torch._dynamo.reset()
    command = ' '.join(['python benchmarks/overhead.py'] + argv_of(args))
    meta = dict(machine(opts['num_threads'], command, args.timer, args.quick), malloc=opts['malloc'], layers=list(classes),
                explicit=explicit, compile=dict(backend='inductor', fullgraph=True, dynamic=False), goal=GOAL_COMPILED)
    return dict(meta=meta, rows=rows)


def variant_of(row):
    "The layer of a compiled row and its positions, as the tables name it."
    return row['layer'] + (', explicit positions' if row.get('positions') == 'explicit' else '')


def variants(rows):
    "The layers and positions of a compiled run's rows, as `variant_of` names them: in the order of `LAYERS`, default positions first."
    ordered = sorted(rows, key=lambda r: (list(LAYERS).index(r['layer']), r.get('positions') == 'explicit'))
    return list(dict.fromkeys(map(variant_of, ordered)))


COMPILED_HEAD = ['layer', 'device', '(B, T, D, H)', 'attention', 'mode', 'layer ms', 'floor ms', 'floor', 'layer / floor',
                 'middle half of rounds', 'eager floor ms', 'compiled floor / eager floor', 'layer / eager floor', 'first call s']


def compiled_cells(rows):
    "One row of cells per case and layer of a compiled run (times in ms; the floor is the compiled one)."
    return [[variant_of(r), r['device'], shape_text(r), r['attention'], r['mode'], f'{r["layer_ms"]:.3f}', f'{r[r["floor"] + "_ms"]:.3f}',
             r['floor'], f'{r["layer_vs_floor"]:.3f}', quartiles_text(r['layer_vs_floor_quartiles']), f'{r["eager_floor_ms"]:.3f}',
             f'{r["floor_vs_eager"]:.3f}', f'{r["layer_vs_eager_floor"]:.3f}', f'{r["layer_compile_s"]:.1f}'] for r in rows]


def compiled_table(rows, as_markdown=False):
    "Every row of a compiled run, as a text table or Markdown."
    return markdown(COMPILED_HEAD, compiled_cells(rows), left=5) if as_markdown else text_table(COMPILED_HEAD, compiled_cells(rows))


COMPILED_GRID_HEAD = ['layer', 'device', '(B, T, D, H)', 'self fwd', 'self fwd+bwd', 'cross fwd', 'cross fwd+bwd',
                      'compiled floor / eager floor: self fwd', 'self fwd+bwd', f'goal met (<= {GOAL_COMPILED:.2f})']


def compiled_grid(rows, as_markdown=False):
    """Ratios of each compiled layer to the compiled floor per shape (self, cross; forward, forward plus backward),
    what compiling gains on the floor (self-attention), and whether the goal is met."""
    cases = {}
    for r in rows: cases.setdefault((variant_of(r), r['device'], shape_text(r)), {})[r['attention'], r['mode']] = r
    order = lambda key: (key[0][0].split(',')[0] not in LAYERS or list(LAYERS).index(key[0][0].split(',')[0]), ', explicit' in key[0][0])
    out = []
    for (name, device, shape), sel in sorted(cases.items(), key=order):
        ratio = lambda key, kind: f'{sel[kind][key]:.3f}' if kind in sel else ''
        out.append([name, device, shape, *[ratio('layer_vs_floor', k) for k in KINDS], *[ratio('floor_vs_eager', ('self', m)) for m in MODES],
                    'yes' if all(r['layer_vs_floor'] <= GOAL_COMPILED for r in sel.values()) else 'no'])
    return markdown(COMPILED_GRID_HEAD, out, left=3) if as_markdown else text_table(COMPILED_GRID_HEAD, out)


def compiled_misses(rows):
    "The rows of a compiled run whose layer costs more than `GOAL_COMPILED` times the compiled floor."
    return [r for r in rows if r['layer_vs_floor'] > GOAL_COMPILED]


def compiled_summary(rows):
    "Closing lines of a compiled run per layer and positions: the worst ratio, and the goal met or the cases that miss it."
    lines = []
    for name in variants(rows):
        sel = [r for r in rows if variant_of(r) == name]
        w, bad = max(sel, key=lambda r: r['layer_vs_floor']), compiled_misses(sel)
        lines.append(f'{name}: worst ratio to the compiled floor {w["layer_vs_floor"]:.3f} ({_where(w, "attention", "mode")}, '
                     f'middle half of the rounds {quartiles_text(w["layer_vs_floor_quartiles"])})')
        lines.append(f'{name}: goal (at most {GOAL_COMPILED:.2f} times the compiled floor) ' +
                     (f'met at all {len(sel)} cases' if not bad else f'missed at {len(bad)} of {len(sel)} cases: ' +
                      '; '.join(f'{shape_text(r)} {r["attention"]} {r["mode"]} {r["layer_vs_floor"]:.3f}' for r in bad)))
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(p, quick_help='two short rounds a case: a smoke run of about a minute', quick_rounds=2)
    p.add_argument('--device', choices=['all', 'cpu', 'cuda'], default='all', help='where to run (default: cpu, and cuda when present)')
    p.add_argument('--layers', nargs='+', choices=list(LAYERS), help='the layers to time (default: every one the package defines)')
    p.add_argument('--plot', metavar='PATH', help='write a plot of the ratio to the floor against T to PATH')
    p.add_argument('--compiled', action='store_true',
                   help='time each layer compiled (torch.compile, fullgraph, inductor) against the compiled floor '
                        '(goal: at most 1.03); with --quick the smallest shape only')
    p.add_argument('--explicit', nargs='*', choices=list(LAYERS), default=['additive'],
                   help='with --compiled: the layers also timed with explicit per-sample positions (default: additive; none: no layer)')
    args = p.parse_args(argv)
    if args.compiled and args.plot: p.error('--plot draws the eager run only')
    results = run(args)
    if args.compiled:
        print(header(results['meta']))
        print(compiled_table(results['rows']))
        print(compiled_grid(results['rows']))
        if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
        print(compiled_summary(results['rows']))
        return results
    print(header(results['meta']))
    print(table(results['rows']))
    print(grid(results['rows']))
    if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot: plot(results['rows'], args.plot)
    print(summary(results['rows']))
    return results


if __name__ == '__main__':
    main()
