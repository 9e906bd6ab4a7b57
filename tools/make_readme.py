"""Write `README.md` from `nbs/index.ipynb` without Quarto.

`nbdev_readme` renders the processed index notebook with Quarto, which many machines lack. This script
runs the same nbdev processing on `nbs/index.ipynb` (the processors `nbdev_proc_nbs` applies), then turns
the processed notebook into GitHub-flavoured markdown with nbconvert's markdown exporter, honouring the
`#| output: asis` and `#| echo: false` that nbdev writes for `show_doc` (other Quarto options are errors, as in
tools/build_docs.py). Links to other pages (`derivation.html`) become links to the notebooks they are
rendered from (`nbs/00_derivation.ipynb`), which work wherever the README is read.

    python tools/make_readme.py           # write README.md
    python tools/make_readme.py --check   # exit 1 if README.md is not what index.ipynb gives
"""
import argparse, re, sys, tempfile
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from nbdev.config import get_config

from _nbread import NotebookError, code, front_matter, printed_markdown, process, quarto_options

def processed_index(nbs_path: Path) -> nbformat.NotebookNode:
    "`nbs/index.ipynb` after nbdev's documentation processors, as `nbdev_proc_nbs` leaves it."
    with tempfile.TemporaryDirectory() as tmp:
        process(nbs_path/'index.ipynb', Path(tmp)/'index.ipynb')
        return nbformat.read(Path(tmp)/'index.ipynb', as_version=4)

def page_sources(nbs_path: Path) -> dict:
    "Each page name (`output-file` in a notebook's front matter) and the notebook it comes from, relative to the root."
    pages = {}
    for path in sorted(nbs_path.glob('*.ipynb')):
        page = front_matter(nbformat.read(path, as_version=4)).get('output-file')
        pages[page or path.with_suffix('.html').name] = f"{nbs_path.name}/{path.name}"
    return pages

def render(nb: nbformat.NotebookNode, pages: dict) -> str:
    "Markdown for the README: title, description, then the cells as Quarto would show them."
    meta, cells = front_matter(nb), []
    head = f"# {meta.get('title', '')}\n\n" if meta else ''
    for cell in nb.cells[1 if meta else 0:]:
        if cell.cell_type == 'code':
            opts = quarto_options(cell, f"nbs/index.ipynb, the cell {code(cell).strip()[:40]!r}")
            if opts.get('output') == 'asis': cell = nbformat.v4.new_markdown_cell(printed_markdown(cell))
            elif opts.get('echo') == 'false': cell.metadata['transient'] = {'remove_source': True}
            else: cell.source = code(cell)
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
    try: text = render(processed_index(nbs_path), page_sources(nbs_path))
    except NotebookError as e:
        print(f"make_readme: error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if readme.read_text() == text: return 0
        print(f"{readme} is out of date with nbs/index.ipynb: run `python tools/make_readme.py`", file=sys.stderr)
        return 1
    readme.write_text(text)
    return 0

if __name__ == '__main__': sys.exit(main())
