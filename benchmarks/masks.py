"""Mask layouts: what `scaled_dot_product_attention` costs with a float mask of each shape, against no mask.

    python benchmarks/masks.py --threads 1 --timer process --json benchmarks/masks.json
    python benchmarks/masks.py --quick            # smoke run

The attention core (`additive_pos_attn.attention.sdpa_mask`) hands the kernel only 4-D masks. This is why: the
same values, laid out as a 3-D `(H, T, T)` mask, as its 4-D view `(1, H, T, T)`, or expanded to `(B, H, T, T)`
with a zero batch stride; and the layouts torch's mask merging produces, `(1, 1, T, T)` for a 2-D `attn_mask` and
`(B, 1, 1, T)` for a `key_padding_mask`. Queries, keys and values are `(B, H, T, D/H)` in float32; eval, no
gradients. Ratios are paired medians over rounds against the unmasked call.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (CPU_SHAPES, clock, command_line, header, machine, markdown, paired, progress, quartiles_text, script,
                     setup, shape_text, text_table, time_case)

LAYOUTS = ('none', '(H, T, T)', '(1, H, T, T)', '(B, H, T, T), batch stride 0', '(1, 1, T, T)', '(B, 1, 1, T)')


def masks(shape, g):
    "Each layout's mask for `shape`, from one `(H, T, T)` table of values (and a `(T, T)` and a `(B, T)` one)."
    B, T, D, H = shape
    bias, square, padding = torch.randn(H, T, T, generator=g), torch.randn(T, T, generator=g), torch.randn(B, T, generator=g)
    return dict(zip(LAYOUTS, (None, bias, bias.view(1, H, T, T), bias.expand(B, H, T, T), square.view(1, 1, T, T),
                              padding.view(B, 1, 1, T))))


def run(args):
    opts = setup(args)
    shapes = [CPU_SHAPES[i] for i in args.shapes] if args.shapes else CPU_SHAPES
    rows = []
    for shape in progress(shapes, lambda s: f'(B, T, D, H)={s}'):
        B, T, D, H = shape
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D // H, generator=g) for _ in range(3))
        def call(mask): return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with torch.no_grad():
            times = time_case({name: call(mask) for name, mask in masks(shape, g).items()}, rounds=opts['rounds'],
                              min_run_time=opts['min_run_time'], num_threads=opts['num_threads'], timer=clock('cpu', args.timer))
        rows.append(dict(B=B, T=T, D=D, H=H, rounds=opts['rounds'], vs_none={n: paired(times, n, 'none') for n in LAYOUTS[1:]}))
    meta = dict(machine(opts['num_threads'], command_line('masks.py', args.argv), args.timer, args.quick), malloc=opts['malloc'])
    return dict(meta=meta, rows=rows)


HEAD = ['(B, T, D, H)', 'mask layout', 'time / no mask', 'middle half of rounds']


def cells(rows):
    return [[shape_text(r), name, f'{v["ratio"]:.3f}', quartiles_text(v['quartiles'])] for r in rows for name, v in r['vs_none'].items()]


def markdown_table(rows): return markdown(HEAD, cells(rows), left=2)


def report(results): return '\n'.join([header(results['meta']), text_table(HEAD, cells(results['rows']))])


def main(argv=None):
    return script(__doc__, run, report, quick_help='fewer, shorter rounds: a smoke run', argv=argv)

if __name__ == '__main__':
    main()
