"""The house rules a reader relies on, checked: the linter's line length, short exported cells, and modules that
import only each other's public names (and nothing from the test helpers)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'additive_pos_attn'
MAX_CELL_LINES = 40


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob('*.py') if p.name != '_modidx.py')


def test_the_linter_passes_on_the_package():
    "ruff (ruff.toml: lines of at most 120 characters, pyflakes) finds nothing, but the one line nbdev writes itself."
    run = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--output-format', 'json', str(PACKAGE)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode in (0, 1), run.stderr
    found = []
    for problem in json.loads(run.stdout or '[]'):
        line = Path(problem['filename']).read_text().splitlines()[problem['location']['row'] - 1]
        # nbdev wraps the names of `__all__` at 120 characters and then writes `__all__ = ` before the first line
        if problem['code'] == 'E501' and line.startswith('__all__ = ['): continue
        found.append(f"{Path(problem['filename']).name}:{problem['location']['row']}: {problem['code']} {problem['message']}")
    assert not found, '\n'.join(found)


def _exported_cells():
    for notebook in sorted((ROOT / 'nbs').glob('*.ipynb')):
        for cell in json.loads(notebook.read_text())['cells']:
            source = ''.join(cell['source'])
            if cell['cell_type'] == 'code' and source.lstrip().startswith(('#| export', '#|export')):
                yield notebook.name, cell.get('id'), source


def test_exported_cells_are_short():
    "A class grows method by method under the prose that explains each: no exported cell is over 40 lines."
    long = [f"{name} cell {cell_id}: {len(source.splitlines())} lines" for name, cell_id, source in _exported_cells()
            if len(source.splitlines()) > MAX_CELL_LINES]
    assert not long, '\n'.join(long)


def _imports(module: Path):
    "The `(module, name)` pairs `module` imports from the package, relative or absolute."
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ''
            if node.level == 1: yield source, [a.name for a in node.names]
            elif source.startswith('additive_pos_attn'): yield source.removeprefix('additive_pos_attn').lstrip('.'), [a.name for a in node.names]


@pytest.mark.parametrize('module', _modules(), ids=lambda p: p.stem)
def test_modules_import_only_public_names(module):
    "No module imports another module's private name (but from `_compat`, the one door to torch's), nor the test helpers."
    for source, names in _imports(module):
        if module.stem != 'testing': assert source != 'testing', f"{module.name} imports the test helpers"
        private = [n for n in names if n.startswith('_')]
        assert source == '_compat' or not private, f"{module.name} imports {', '.join(private)} from {source}"


def test_the_checks_fail_on_what_they_guard(tmp_path):
    "The import rule sees a private name and the test helpers, relative or absolute."
    bad = tmp_path / 'bad.py'
    bad.write_text('from .encoder import _drop\nfrom additive_pos_attn.testing import random_layer\n')
    assert list(_imports(bad)) == [('encoder', ['_drop']), ('testing', ['random_layer'])]
