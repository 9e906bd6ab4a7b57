"""Notebooks read the way nbdev reads them, for the tools beside this file (build_docs, make_readme,
execute_notebooks): nbdev's own parsers for `#|` directives and front matter, and its doc processing."""
import os
from pathlib import Path

from nbdev.frontmatter import _fm2dict
from nbdev.process import extract_directives, first_code_ln
from nbdev.processors import FilterDefaults
import nbdev.serve_drv


# The Quarto options nbdev leaves in processed notebooks that the docs tools translate, and the one value each may
# take (None: any). nbdev's own directives (`export`, `hide`, `cuda`, ...) are gone by then: its processing removes them.
TRANSLATED = {'echo': 'false', 'output': 'asis', 'fig-alt': None, 'eval': 'false'}


class NotebookError(Exception):
    "A notebook the tools cannot use; the message names it and says what went wrong."


def directives(cell) -> dict:
    "A code cell's leading `#|` directives as nbdev parses them: `#| export` -> `{'export': ''}`, `#| eval: false` -> `{'eval': 'false'}`."
    return {k.rstrip(':'): ' '.join(v) for k, v in extract_directives(cell, remove=False).items()}


def quarto_options(cell, where: str) -> dict:
    "The directives of a processed code cell, which must all be `TRANSLATED`; `where` names the cell in the error."
    opts = directives(cell)
    if bad := [f"#| {k}: {v}" for k, v in opts.items() if k not in TRANSLATED or TRANSLATED[k] not in (None, v)]:
        known = ', '.join(f"#| {k}: {v or '...'}" for k, v in TRANSLATED.items())
        raise NotebookError(f"{where}: {', '.join(bad)} is not translated by the docs tools, which know {known}")
    return opts


def printed_markdown(cell) -> str:
    "What an `#| output: asis` cell (such as nbdev's `show_doc` cells) printed: markdown."
    return '\n\n'.join(''.join(o.get('text') or o.get('data', {}).get('text/markdown', '')).strip('\n') for o in cell.outputs)


def code(cell) -> str:
    "A code cell's source after its leading `#|` directives (nbdev's `first_code_ln`)."
    lines = cell.source.splitlines(keepends=True)
    start = first_code_ln(lines)
    return ''.join(lines[len(lines) if start is None else start:])


def front_matter(nb) -> dict:
    "The YAML front matter (`---` ... `---`) of a notebook's first cell, as nbdev reads it; {} if there is none."
    first = nb.cells[0] if nb.cells else None
    return _fm2dict(first.source) if first and first.cell_type in ('markdown', 'raw') else {}


def process(src: Path, dst: Path):
    "Write to `dst` what nbdev's doc processing (`nbdev_proc_nbs`) makes of the notebook `src`."
    try: nbdev.serve_drv.main((Path(src), Path(dst), FilterDefaults))
    except Exception as e:
        raise NotebookError(f"nbdev could not process {src}:\n{e}\ncaused by: {e.__cause__!r}") from e
    finally: os.environ.pop('IN_TEST', None)  # nbdev sets it while processing and leaves it set on an error
