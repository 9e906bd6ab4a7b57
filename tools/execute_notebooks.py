"""Run notebooks and store their outputs, so the docs and the README show them.

Cells that cannot run here are skipped and keep no outputs: those flagged with one of `tst_flags` in
`settings.ini` (such as `cuda`), and `#| eval: false` cells. Cells flagged `slow` do run: `nbdev_test` skips them
to stay fast, but the docs show what they compute. Afterwards the notebooks are cleaned with `nbdev_clean`.

    python tools/execute_notebooks.py                       # every notebook in nbs/
    python tools/execute_notebooks.py nbs/06_additive.ipynb # some of them
"""
import argparse, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.clean import nbdev_clean
from nbdev.config import get_config

from _nbread import directives

RUN_HERE = {'slow'}  # flags whose cells run here all the same

def skipped(cell, flags: set) -> bool:
    "Whether this cell cannot run here: flagged with one of `flags` (but `slow`), or `eval: false`."
    if cell.cell_type != 'code': return True
    opts = directives(cell)
    return bool(opts.keys() & (flags - RUN_HERE)) or opts.get('eval', '').lower() == 'false'

def execute(path: Path, flags: set) -> float:
    "Run `path` in a fresh kernel, store its outputs in place; return the seconds it took."
    nb, start = read_nb(path), time.time()
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
    shell = CaptureShell(path)
    with working_directory(path.parent): shell.run_all(nb, exc_stop=True, preproc=lambda c: skipped(c, flags))
    write_nb(nb, path)
    return time.time() - start

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('notebooks', nargs='*', type=Path)
    args = parser.parse_args(argv)
    cfg = get_config()
    flags = set(cfg.tst_flags.split())
    for path in args.notebooks or sorted(cfg.path('nbs_path').glob('*.ipynb')):
        try: print(f"{path.name}: {execute(path.resolve(), flags):.1f} s", flush=True)
        except Exception as e:
            print(f"{path.name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        nbdev_clean(str(path))
    return 0

if __name__ == '__main__': sys.exit(main())
