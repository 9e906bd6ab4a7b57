"""The timing harness the benchmark scripts share: the floor, interleaved rounds, paired ratios, saved bytes.

Pure torch: nothing here imports the package, so a script that needs only the harness (`paths.py`) measures
what it defines itself, and `compare.py` can import two versions of the package side by side.

- `floor_attention`, `baselines`: attention without positions at its cheapest, and bare `nn.MultiheadAttention`;
  the floor of a case is the faster of the two (`floor_of`).
- `time_case`: interleaved rounds, the order of the implementations rotating from round to round;
  `paired_ratio` and `paired_quartiles`: the median and the middle half over rounds of the ratio of two
  implementations timed side by side in the same round.
- `saved_bytes`: the bytes autograd saves for backward in one call, parameters left out.
- `LAYERS`, `make_layer`: the package's layers as the benchmarks build them (by class, so any version of the package).
- `steady_malloc`, `clock`, `add_timing_args`, `setup`, `machine`: the run's conditions and their record.
"""
import argparse, ctypes, ctypes.util, json, os, platform, statistics, sys, time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils import benchmark

CPU_SHAPES = [(32, 64, 128, 4), (8, 128, 256, 8), (8, 512, 256, 8), (2, 1024, 512, 8)]  # (B, T, D, H)
MODES = ('forward', 'forward+backward')  # eval mode under no_grad; train mode, forward and backward


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def split_heads(t, num_heads, parts=1):
    "View `(B, T, parts·D)` as `parts` tensors `(B, H, T, D/H)` (one tensor when `parts == 1`)."
    B, T, width = t.shape
    heads = [h.transpose(1, 2) for h in t.view(B, T, parts, num_heads, width // (parts * num_heads)).unbind(2)]
    return heads if parts > 1 else heads[0]


def attend(attn: torch.nn.MultiheadAttention, q, k, v):
    "SDPA of the heads `(B, H, T, D/H)` (no masks; `attn`'s dropout in training) and `attn`'s output projection."
    B, H, T, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if attn.training else 0.0)
    return F.linear(out.transpose(1, 2).reshape(B, T, H * d), attn.out_proj.weight, attn.out_proj.bias)


def floor_attention(attn: torch.nn.MultiheadAttention, query, key, value):
    "Attention without positions at its cheapest: packed in-projection, SDPA, out-projection (no masks, no dropout)."
    D, H = query.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    # Heads are split with `unbind(2)` and then transposed: the backward then stacks the heads' gradients straight
    # into the projection's (B, T, 3, H, D/H) layout; `permute(2, 0, 3, 1, 4).unbind(0)` costs one more strided copy.
    if query is key and key is value: return attend(attn, *split_heads(F.linear(query, w, b), H, 3))
    # cross-attention, key is value: one projection for the query, a packed one for key and value
    wq, wkv = w.split([D, 2 * D])
    bq, bkv = (None, None) if b is None else b.split([D, 2 * D])
    return attend(attn, split_heads(F.linear(query, wq, bq), H), *split_heads(F.linear(key, wkv, bkv), H, 2))


def baselines(attn: torch.nn.MultiheadAttention, x, mem=None):
    "The callables of the floor: bare `attn(x, kv, kv)` ('mha') and `floor_attention` ('floor'), each returning the output."
    kv = x if mem is None else mem
    return {'mha': lambda: attn(x, kv, kv, need_weights=False)[0], 'floor': lambda: floor_attention(attn, x, kv, kv)}


def floor_of(times):
    "The floor of a case: the faster by median of 'mha' and 'floor' in `time_case`'s answer."
    return 'mha' if times['mha'][0] < times['floor'][0] else 'floor'


class LayerSpec(NamedTuple):
    "How the benchmarks build one of the package's layers: where its class is, its options, its table."
    module: str  # the package's submodule that defines the class
    cls: str
    options: Callable[[int], dict]  # the constructor's keyword options for a sequence length T
    table: Optional[str] = None  # the learned table the benchmark fills with random values, as a trained layer might have
    std: float = 1.0  # their standard deviation (the values do not change the cost)


# The layers `overhead.py` times, by the names of its `--layers` option. The relative layer clips offsets at T5's
# `max_distance` of 128: the two large CPU shapes (T of 512 and 1024) then exercise the clipping and the two small
# ones (T of 64 and 128) do not; the bias it gathers is `(H, T_q, T_k)` whatever the clip, so the clip does not
# change the cost. The rotary layer has no table.
LAYERS = {'additive': LayerSpec('additive', 'AdditivePosMultiheadAttention', lambda T: dict(max_len=2 * T), 'pos_emb', 0.02),
          'relative': LayerSpec('relative', 'AdditiveRelMultiheadAttention', lambda T: dict(max_distance=128), 'rel_bias', 1.0),
          # T5's buckets (its 32 and max_distance of 128): the same gather from a table of 32 rows, through the bucket
          # of each clipped offset, computed once when the layer is built
          'relative-t5': LayerSpec('relative', 'AdditiveRelMultiheadAttention',
                                   lambda T: dict(num_buckets=32, max_distance=128), 'rel_bias', 1.0),
          'rotary': LayerSpec('rotary', 'RoPEMultiheadAttention', lambda T: {}),
          # rotary extended 4 times past a training length of T/4 (its frequencies kept, or, 'dynamic', per call), and
          # partial rotary on 16 channels: half a head in three CPU shapes, a quarter (GPT-NeoX's) in the last
          'rotary-yarn': LayerSpec('rotary', 'RoPEMultiheadAttention', lambda T: dict(rope_scaling=dict(
              rope_type='yarn', factor=4.0, original_max_position_embeddings=max(T // 4, 1)))),
          'rotary-dynamic': LayerSpec('rotary', 'RoPEMultiheadAttention', lambda T: dict(rope_scaling=dict(
              rope_type='dynamic', factor=4.0, original_max_position_embeddings=max(T // 4, 1)))),
          'rotary-partial': LayerSpec('rotary', 'RoPEMultiheadAttention', lambda T: dict(rotary_dim=16)),
          # ALiBi: the paper's fixed slopes (a buffer, not a table), its bias a float mask of the fused kernel
          'alibi': LayerSpec('alibi', 'ALiBiMultiheadAttention', lambda T: {})}


def make_layer(cls, shape, device='cpu', dtype=torch.float32, seed=0, spec=LAYERS['additive']):
    "A seeded `cls(D, H, **spec.options(T))` (the package's layer, of any version) with a random table, as a trained one might have."
    B, T, D, H = shape
    torch.manual_seed(seed)
    layer = cls(D, H, **spec.options(T), device=device, dtype=dtype)
    if spec.table:
        with torch.no_grad(): getattr(layer, spec.table).normal_(std=spec.std)  # its values do not change the cost
    return layer


def layer_call(layer, x, mem=None):
    "The layer's output for `x` attending to itself or to `mem`, as a callable."
    kv = x if mem is None else mem
    return lambda: layer(x, kv, kv)[0]


def make_inputs(shape, attention, mode, device='cpu', dtype=torch.float32, seed=1):
    """Inputs of a case: `x`, the memory (None for self-attention) and the output's gradient (None for 'forward').
    With 'forward+backward' the inputs require grad."""
    B, T, D, H = shape
    g = torch.Generator(device='cpu').manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    mem = None if attention == 'self' else torch.randn(B, T, D, generator=g).to(device, dtype)
    if mode == 'forward': return x, mem, None
    for t in (x, mem):
        if t is not None: t.requires_grad_(True)
    return x, mem, torch.ones(B, T, D, device=device, dtype=dtype)


def timed(fns, grad=None):
    """The statements to time: each callable of `fns` (returning an output) under `no_grad` when `grad` is None,
    else followed by the backward pass from `grad` (parameter gradients accumulate, as in training)."""
    def forward(f):
        def run():
            with torch.no_grad(): f()
        return run
    def backward(f): return lambda: f().backward(grad)
    return {name: (forward if grad is None else backward)(f) for name, f in fns.items()}


def saved_bytes(module, fn):
    "Bytes autograd saves for backward in one call of `fn`: distinct storages, each counted once, `module`'s parameters left out."
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
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


def paired(times, a, b):
    "`paired_ratio` and `paired_quartiles` of `a` to `b`, as a dict for a results row."
    return {'ratio': paired_ratio(times, a, b), 'quartiles': paired_quartiles(times, a, b)}


def quartiles_text(q):
    "The middle half of the rounds as `q1-q3`."
    return f'{q[0]:.3f}-{q[1]:.3f}'


def shape_text(row):
    return f'({row["B"]}, {row["T"]}, {row["D"]}, {row["H"]})'


def steady_malloc() -> str:
    "Fix glibc's malloc thresholds (see overhead.py's docstring); returns what was done, for the record."
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


def add_timing_args(p: argparse.ArgumentParser, quick_help='fewer, shorter rounds: a smoke run', quick_rounds=3, threads=0, timer='wall'):
    """The options every benchmark script takes: how long, how many threads, which clock, which allocator, where to write.
    `--quick` runs `quick_rounds` rounds (a script that times many implementations a case may want fewer); `threads`
    and `timer` are the defaults of `--threads` and `--timer` (a script may default to one thread and process time)."""
    p.add_argument('--quick', action='store_true', help=quick_help)
    p.set_defaults(quick_rounds=quick_rounds)
    p.add_argument('--rounds', type=int, default=15, help=f'interleaved rounds per case (default 15; --quick: {quick_rounds})')
    p.add_argument('--min-run-time', type=float, default=0.1, help='seconds per implementation per round (default 0.1; --quick: 0.05)')
    p.add_argument('--threads', type=int, default=threads, help=f'torch threads (default: {threads or "torch.get_num_threads()"})')
    p.add_argument('--timer', choices=['wall', 'process'], default=timer,
                   help="'process' times CPU time of this process instead of wall time: steadier on a busy machine "
                        f"with --threads 1 (CPU only; it also counts the time threads spend spinning); default {timer}")
    p.add_argument('--malloc', choices=['steady', 'system'], default='steady',
                   help="'steady' (default) fixes glibc's malloc thresholds so that page faults do not land on one "
                        "implementation by chance; 'system' leaves the allocator as it is")
    p.add_argument('--shapes', type=int, nargs='*', help='indices into the shape list, to run a subset')
    p.add_argument('--json', metavar='PATH', help='write the results and a description of the machine to PATH')
    return p


def script(doc, run, report, *, quick_help, options=None, argv=None):
    """A benchmark script's `main`: parse the shared options (and those `options(parser)` adds), `run(args)`, print
    `report(results)`, write `--json`; returns the results."""
    p = add_timing_args(argparse.ArgumentParser(description=doc.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter),
                        quick_help=quick_help)
    if options: options(p)
    args = p.parse_args(argv)
    args.argv = argv  # for `command_line`
    results = run(args)
    print(report(results))
    if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def setup(args):
    "Apply the allocator and thread options; returns `dict(malloc=..., num_threads=..., rounds=..., min_run_time=...)`."
    malloc = steady_malloc() if args.malloc == 'steady' else 'system'
    log(f'allocator: {malloc}')
    num_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(num_threads)
    rounds, min_run_time = (args.quick_rounds, 0.05) if args.quick else (args.rounds, args.min_run_time)
    return dict(malloc=malloc, num_threads=num_threads, rounds=rounds, min_run_time=min_run_time)


def progress(plan, describe):
    "Iterate over `plan`, logging each case (`describe(case)`) with the time elapsed."
    start = time.perf_counter()
    for i, case in enumerate(plan):
        log(f'[{i + 1}/{len(plan)}] {describe(case)} ({time.perf_counter() - start:.0f}s)')
        yield case
    log(f'done in {time.perf_counter() - start:.0f}s')


def command_line(script, argv=None):
    "The command that reproduces a run of `benchmarks/<script>` with `argv` (default: this process's arguments)."
    return ' '.join([f'python benchmarks/{script}'] + list(sys.argv[1:] if argv is None else argv))


def machine(num_threads, command, timer, quick):
    "A description of the machine and the run, for the results' `meta`."
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
        if names: cpu = names[0]
    except OSError: pass
    meta = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), cpu=cpu, cores=os.cpu_count(), threads=num_threads,
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                command=command, timer=timer, quick=quick)
    if torch.cuda.is_available(): meta['gpu'] = torch.cuda.get_device_name()
    return meta


def header(meta):
    "The run's first printed line: command, date, machine, torch."
    return (f'# {meta["command"]}  |  {meta["date"]}  |  {meta["cpu"]}, {meta["cores"]} cores, {meta["threads"]} threads'
            f'{"  |  " + meta["gpu"] if "gpu" in meta else ""}  |  torch {meta["torch"]}  |  malloc {meta.get("malloc", "?")}')


def text_table(head, rows):
    "Rows of cells (strings) as a fixed-width text table, the first column left-aligned."
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: '  '.join(f'{c:<{w}}' if i == 0 else f'{c:>{w}}' for i, (c, w) in enumerate(zip(cells, widths)))
    return '\n'.join([line(head), '-' * len(line(head))] + [line(r) for r in rows])


def markdown(head, rows, left=1):
    "Rows of cells as a Markdown table, the first `left` columns left-aligned."
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * left + ['--:'] * (len(head) - left)) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows])
