"""Edit notebooks as plain text without losing cell ids.

A notebook is written out as a text file of cells, edited in any editor, and read back. Reading back keeps
the id (and the stored outputs) of every cell whose source is unchanged, matching cells by their type and
source, so a commit that changes one cell shows one cell in `git diff`, and the `# %% ... #id` markers of the
exported modules stay put. A cell may move between notebooks: name the notebook it came from with `--from`,
and it keeps its id there too. Only cells whose source changed, or that are new, get new ids.

    python tools/nbcells.py text nbs/02_positions.ipynb > /tmp/positions.txt    # notebook -> text
    $EDITOR /tmp/positions.txt
    python tools/nbcells.py write /tmp/positions.txt nbs/02_positions.ipynb     # text -> notebook, ids kept
    python tools/nbcells.py write new.txt nbs/03_new.ipynb --from nbs/02_old.ipynb   # cells moved from 02_old

The text format: each cell starts with a line `# %%` (code) or `# %% [markdown]`; everything up to the
next such line is its source, verbatim (trailing blank lines are dropped). Afterwards run `nbdev_clean`.
"""
import argparse, json, re, secrets, sys
from pathlib import Path

_HEADER = re.compile(r'^# %%(?: \[(markdown|code)\])?\s*$')


def read_notebook(path) -> dict:
    "The notebook at `path` as a dict."
    return json.loads(Path(path).read_text(encoding='utf-8'))


def source(cell: dict) -> str:
    "A cell's source as one string."
    src = cell.get('source', '')
    return src if isinstance(src, str) else ''.join(src)


def to_text(nb: dict) -> str:
    "The cells of `nb` in the text format."
    parts = []
    for cell in nb['cells']:
        parts.append('# %% [markdown]' if cell['cell_type'] == 'markdown' else '# %%')
        parts.append(source(cell))
    return '\n'.join(parts) + '\n'


def parse_text(text: str) -> list[tuple[str, str]]:
    "The `(cell_type, source)` pairs of a text file."
    cells, kind, lines = [], None, []
    def close():
        if kind is not None: cells.append((kind, '\n'.join(lines).rstrip('\n')))
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            close()
            kind, lines = m.group(1) or 'code', []
        elif kind is None:
            if line.strip(): raise ValueError(f"text before the first '# %%' line: {line!r}")
        else: lines.append(line)
    close()
    return cells


def _lines(src: str) -> list[str]:
    "A source as Jupyter stores it: a list of lines, each but the last ending in a newline."
    return src.splitlines(keepends=True)


def build(cells: list[tuple[str, str]], old: dict, donors: list[dict] = ()) -> tuple[dict, dict]:
    """A notebook with `cells`, in `old`'s format. Each cell takes the id, metadata and outputs of the first unused
    cell of the same type and source in `old`, then in `donors`; the rest get fresh ids. Returns the notebook and
    counts: kept (from `old`), moved (from a donor), new."""
    pool = {}
    for nb in [old, *donors]:
        for cell in nb.get('cells', []): pool.setdefault((cell['cell_type'], source(cell)), []).append((nb is old, cell))
    used_ids = set()
    out, counts = [], {'kept': 0, 'moved': 0, 'new': 0}
    for kind, src in cells:
        match = None
        for i, (own, cell) in enumerate(pool.get((kind, src), [])):
            if cell.get('id') not in used_ids:
                match = pool[(kind, src)].pop(i)
                break
        if match is not None:
            own, cell = match
            cell = dict(cell)
            counts['kept' if own else 'moved'] += 1
        else:
            cell = {'cell_type': kind, 'metadata': {}, 'source': _lines(src)}
            if kind == 'code': cell.update(execution_count=None, outputs=[])
            counts['new'] += 1
        while not cell.get('id') or cell['id'] in used_ids: cell['id'] = secrets.token_hex(4)
        used_ids.add(cell['id'])
        out.append(cell)
    nb = {k: v for k, v in old.items() if k != 'cells'} or {
        'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
        'nbformat': 4, 'nbformat_minor': 5}
    return {'cells': out, **nb}, counts


def write_notebook(nb: dict, path):
    "Write `nb` as nbdev_clean writes notebooks: one-space indents, a final newline."
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    text = sub.add_parser('text', help='print a notebook in the text format')
    text.add_argument('notebook', type=Path)
    write = sub.add_parser('write', help='write a notebook from a text file, keeping the ids of unchanged cells')
    write.add_argument('text', type=Path)
    write.add_argument('notebook', type=Path)
    write.add_argument('--from', dest='donors', type=Path, nargs='*', default=[], help='notebooks cells may have moved from')
    args = parser.parse_args(argv)
    if args.command == 'text':
        sys.stdout.write(to_text(read_notebook(args.notebook)))
        return 0
    old = read_notebook(args.notebook) if args.notebook.exists() else {}
    nb, counts = build(parse_text(args.text.read_text(encoding='utf-8')), old, [read_notebook(p) for p in args.donors])
    write_notebook(nb, args.notebook)
    print(f"{args.notebook}: {counts['kept']} cells kept, {counts['moved']} moved in, {counts['new']} new or changed", file=sys.stderr)
    return 0


if __name__ == '__main__': sys.exit(main())
