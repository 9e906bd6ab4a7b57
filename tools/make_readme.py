"""Write `README.md` from `nbs/index.ipynb` without Quarto.

`nbdev_readme` renders the processed index notebook with Quarto, which many machines lack. This script
runs the same nbdev processing on `nbs/index.ipynb` (the processors `nbdev_proc_nbs` applies), then turns
the processed notebook into GitHub-flavoured markdown with nbconvert's markdown exporter, honouring the
Quarto cell options nbdev leaves behind. Links to other pages (`derivation.html`) become links to the
notebooks they are rendered from (`nbs/00_derivation.ipynb`), which work wherever the README is read.

    python tools/make_readme.py           # write README.md
    python tools/make_readme.py --check   # exit 1 if README.md is not what index.ipynb gives
"""
import argparse, re, sys, tempfile
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from nbdev.config import get_config
from nbdev.processors import FilterDefaults
from nbdev.serve_drv import exec_nb

_directive = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def cell_options(cell) -> dict:
    "Quarto/nbdev `#| key: value` options at the top of a cell, and its source without them."
    opts, lines = {}, cell.source.splitlines()
    while lines and _directive.match(lines[0]):
        key, value = _directive.match(lines.pop(0)).groups()
        opts[key] = value
    return opts, '\n'.join(lines).strip('\n')

def processed_index(nbs_path: Path) -> nbformat.NotebookNode:
    "`nbs/index.ipynb` after nbdev's documentation processors, as `nbdev_proc_nbs` leaves it."
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp)/'index.ipynb'
        exec_nb(nbs_path/'index.ipynb', dst, FilterDefaults)
        return nbformat.read(dst, as_version=4)

def front_matter(cell) -> dict:
    "Title and description from a markdown front-matter cell (`---` ... `---`), else {}."
    text = cell.source.strip()
    if cell.cell_type not in ('markdown', 'raw') or not text.startswith('---'): return {}
    fields = {}
    for line in text.strip('-').strip().splitlines():
        if ':' in line:
            key, value = line.split(':', 1)
            fields[key.strip()] = value.strip().strip('"')
    return fields

def page_sources(nbs_path: Path) -> dict:
    "Each page name (`output-file` in a notebook's front matter) and the notebook it comes from, relative to the root."
    pages = {}
    for path in sorted(nbs_path.glob('*.ipynb')):
        nb = nbformat.read(path, as_version=4)
        page = front_matter(nb.cells[0]).get('output-file') if nb.cells else None
        pages[page or path.with_suffix('.html').name] = f"{nbs_path.name}/{path.name}"
    return pages

def render(nb: nbformat.NotebookNode, pages: dict) -> str:
    "Markdown for the README: title, description, then the cells as Quarto would show them."
    meta, cells = front_matter(nb.cells[0]), []
    head = f"# {meta.get('title', '')}\n\n" if meta else ''
    for cell in nb.cells[1 if meta else 0:]:
        if cell.cell_type == 'code':
            opts, cell.source = cell_options(cell)
            if opts.get('include') == 'false' or opts.get('echo') == 'false' and opts.get('output') == 'false': continue
            if opts.get('output') == 'false': cell.outputs = []
            if opts.get('output') == 'asis':  # the markdown the cell printed, as markdown
                text = ''.join(o.get('text', '') or o.get('data', {}).get('text/markdown', '') for o in cell.outputs)
                cell = nbformat.v4.new_markdown_cell(text)
            elif opts.get('echo') == 'false': cell.metadata['transient'] = {'remove_source': True}
        cells.append(cell)
        if meta.get('description') and len(cells) == 1 and cell.cell_type == 'markdown' and 'WARNING' in cell.source:
            cells.append(nbformat.v4.new_markdown_cell(f"> {meta['description']}"))
    metadata = {**nb.metadata, 'language_info': {'name': 'python'}}  # fences code as ```python
    body, _ = MarkdownExporter().from_notebook_node(nbformat.v4.new_notebook(cells=cells, metadata=metadata))
    def link(m):
        if m[1] not in pages: raise ValueError(f"index.ipynb links to {m[1]}, which no notebook renders")
        return f"]({pages[m[1]]}{m[2] or ''})"
    body = re.sub(r'\]\((?!https?://)([\w.-]+\.html)(#[\w.-]*)?\)', link, body)
    return (head + re.sub(r'\n{3,}', '\n\n', body)).strip() + '\n'

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='do not write; exit 1 if README.md differs')
    args = parser.parse_args(argv)
    cfg = get_config()
    readme = cfg.config_path/'README.md'
    nbs_path = cfg.path('nbs_path')
    text = render(processed_index(nbs_path), page_sources(nbs_path))
    if args.check:
        if readme.read_text() == text: return 0
        print(f"{readme} is out of date with nbs/index.ipynb: run `python tools/make_readme.py`", file=sys.stderr)
        return 1
    readme.write_text(text)
    return 0

if __name__ == '__main__': sys.exit(main())
