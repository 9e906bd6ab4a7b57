"""Before and after: the layer of a git revision against the working tree's, timed in the same interleaved rounds.

    python benchmarks/compare.py --threads 1 --timer process          # before = 6b57832, after = working tree
    python benchmarks/compare.py --before HEAD~3 --quick              # smoke run

The package `additive_pos_attn/` at revision `--before` is extracted (`git show REV:path`, file by file) into
a temporary folder as the package `additive_pos_attn_before` (the package imports itself relatively; any
absolute self-import is renamed), and imported beside the working tree's `additive_pos_attn`. Both layers
get the same weights and table (the after layer is built seeded, the before layer loads its `state_dict`),
and their outputs are checked to agree before timing.

Each case (the four CPU shapes; self- and cross-attention; eval forward under `no_grad`, train forward plus
backward) times four implementations in the same rotating rounds: `before`, `after`, and the floor's two,
`floor` (`harness.floor_attention`) and `mha` (bare `nn.MultiheadAttention`); the floor of a case is the
faster. Reported: each layer's paired ratio to the floor with the middle half of the rounds, the difference
of the two ratios, the paired ratio after / before (the most direct comparison: both in the same rounds),
and, in training, the bytes each layer saves for backward beyond bare MHA, in `(B, T, D)` tensors.
Comparing a revision with itself shows the harness's own spread.
"""
import importlib, re, statistics, subprocess, sys, tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (CPU_SHAPES, LAYERS, MODES, baselines, clock, command_line, floor_of, header, layer_call, machine, make_inputs,
                     make_layer, markdown, paired, progress, quartiles_text, saved_bytes, script, setup, shape_text, text_table,
                     time_case, timed)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, BEFORE_NAME, DEFAULT_BEFORE = 'additive_pos_attn', 'additive_pos_attn_before', '6b57832'
_SELF_IMPORT = re.compile(rf'\b((?:from|import)\s+){PACKAGE}\b')


def git(*args) -> str:
    return subprocess.run(['git', '-C', str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def extract(rev, dest) -> str:
    "Write the package's `.py` files at `rev` under `dest` as the package `additive_pos_attn_before`; returns the full hash."
    commit = git('rev-parse', '--verify', f'{rev}^{{commit}}').strip()
    files = [f for f in git('ls-tree', '-r', '--name-only', commit, '--', PACKAGE).split() if f.endswith('.py')]
    if not files: raise SystemExit(f'{rev}: no {PACKAGE}/*.py at that revision')
    for f in files:
        path = Path(dest) / BEFORE_NAME / Path(f).relative_to(PACKAGE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_SELF_IMPORT.sub(rf'\g<1>{BEFORE_NAME}', git('show', f'{commit}:{f}')))
    return commit


def import_both(rev, dest):
    "The package at `rev` and the working tree's package, imported side by side; returns (before, after, full hash)."
    commit = extract(rev, dest)
    sys.path[:0] = [str(ROOT), str(dest)]  # the working tree first, before any installed copy
    before, after = importlib.import_module(BEFORE_NAME), importlib.import_module(PACKAGE)
    for module, where in ((before, Path(dest)), (after, ROOT)):
        if where.resolve() not in Path(module.__file__).resolve().parents: raise SystemExit(f'{module.__name__} imported from {module.__file__}')
    return before, after, commit


def make_pair(before, after, shape, name='additive'):
    "The layer `name` (see `harness.LAYERS`) of both versions: the after one seeded, the before one with its weights."
    spec = LAYERS[name]
    new = make_layer(getattr(after, spec.cls), shape, spec=spec)
    old = getattr(before, spec.cls)(shape[2], shape[3], **spec.options(shape[1]))
    old.load_state_dict(new.state_dict())
    return old, new


def measure(before, after, shape, attention, mode, opts, timer, name='additive'):
    "One case of the layer `name`: both versions and the floor in the same rounds; a results row."
    old, new = make_pair(before, after, shape, name)
    x, mem, grad = make_inputs(shape, attention, mode)
    for layer in (old, new): layer.train(mode != 'forward')
    calls = {'before': layer_call(old, x, mem), 'after': layer_call(new, x, mem), **baselines(new.attn, x, mem)}
    with torch.no_grad(): torch.testing.assert_close(calls['after'](), calls['before'](), msg=lambda m: f'after != before: {m}')
    times = time_case(timed(calls, grad), rounds=opts['rounds'], min_run_time=opts['min_run_time'], num_threads=opts['num_threads'],
                      timer=timer)
    floor = floor_of(times)
    row = dict(layer=name, B=shape[0], T=shape[1], D=shape[2], H=shape[3], attention=attention, mode=mode, floor=floor,
               rounds=opts['rounds'],
               ms={n: t[0] * 1e3 for n, t in times.items()}, before=paired(times, 'before', floor),
               after=paired(times, 'after', floor), after_vs_before=paired(times, 'after', 'before'))
    if grad is not None:  # saved for backward beyond bare MHA, in (B, T, D) tensors
        mha, btd = saved_bytes(new, calls['mha']), x.numel() * x.element_size()
        row['extra_saved_btd'] = {n: (saved_bytes(m, calls[n]) - mha) / btd for n, m in (('before', old), ('after', new))}
    return row


def run(args):
    opts = setup(args)
    shapes = [CPU_SHAPES[i] for i in args.shapes] if args.shapes else CPU_SHAPES
    with tempfile.TemporaryDirectory() as dest:
        before, after, commit = import_both(args.before, dest)
        changed = ', package modified' if git('status', '--porcelain', '--', PACKAGE).strip() else ''
        label = f'working tree (HEAD {git("rev-parse", "--short", "HEAD").strip()}{changed})'  # as imported
        plan = [(s, a, m, n) for n in args.layers for s in shapes for a in ('self', 'cross') for m in MODES]
        rows = [measure(before, after, s, a, m, opts, clock('cpu', args.timer), n)
                for s, a, m, n in progress(plan, lambda c: f'{c[3]} (B, T, D, H)={c[0]} {c[1]} {c[2]}')]
    meta = dict(machine(opts['num_threads'], command_line('compare.py', args.argv), args.timer, args.quick), malloc=opts['malloc'],
                before=commit, after=label)
    return dict(meta=meta, rows=rows)

HEAD = ['layer', 'attention', 'mode', '(B, T, D, H)', 'before / floor', 'middle half', 'after / floor', 'middle half', 'difference',
        'after / before', 'middle half', 'extra saved (B, T, D): before', 'after']


def cells(rows):
    out = []
    for r in rows:
        saved = r.get('extra_saved_btd')
        out.append([r.get('layer', 'additive'), r['attention'], r['mode'], shape_text(r), f'{r["before"]["ratio"]:.3f}', quartiles_text(r['before']['quartiles']),
                    f'{r["after"]["ratio"]:.3f}', quartiles_text(r['after']['quartiles']),
                    f'{r["after"]["ratio"] - r["before"]["ratio"]:+.3f}', f'{r["after_vs_before"]["ratio"]:.3f}',
                    quartiles_text(r['after_vs_before']['quartiles']),
                    *((f'{saved["before"]:.2f}', f'{saved["after"]:.2f}') if saved else ('', ''))])
    return out


def summary(rows):
    "Closing lines: how far after / before strays from 1, and the worst case each way."
    ratios = [r['after_vs_before']['ratio'] for r in rows]
    fast, slow = min(rows, key=lambda r: r['after_vs_before']['ratio']), max(rows, key=lambda r: r['after_vs_before']['ratio'])
    where = lambda r: f'{r.get("layer", "additive")} {r["attention"]} {r["mode"]} {shape_text(r)}'
    return (f'after / before over {len(rows)} cases: median {statistics.median(ratios):.3f}, from {min(ratios):.3f} ({where(fast)}) '
            f'to {max(ratios):.3f} ({where(slow)})')


def markdown_table(rows):
    return markdown(HEAD, cells(rows), left=4)


def report(results):
    "What the script prints: the run and both revisions, the table, the spread of after / before."
    meta = results['meta']
    return '\n'.join([header(meta) + f'  |  before {meta["before"][:10]}, after {meta["after"]}', text_table(HEAD, cells(results['rows'])),
                      summary(results['rows'])])


def main(argv=None):
    def options(p):
        p.add_argument('--before', default=DEFAULT_BEFORE, metavar='REV',
                       help=f'the git revision to compare with (default {DEFAULT_BEFORE})')
        p.add_argument('--layers', nargs='+', choices=list(LAYERS), default=['additive'],
                       help='the layers to compare (default: additive)')
    return script(__doc__, run, report, quick_help='fewer, shorter rounds: a smoke run of about a minute', options=options, argv=argv)

if __name__ == '__main__':
    main()
