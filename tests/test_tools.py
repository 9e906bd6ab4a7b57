"""tools/nbcells.py: notebooks edited as text keep the id (and outputs) of every cell whose source is unchanged."""
import importlib.util, json, shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT/'nbs'/'15_demo.ipynb'  # a real notebook, with outputs; only ever read, through copies


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT/'tools'/f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

nbcells = _load('nbcells')


@pytest.fixture
def nb_path(tmp_path) -> Path:
    "A copy of a real notebook."
    shutil.copy(NOTEBOOK, tmp_path/NOTEBOOK.name)
    return tmp_path/NOTEBOOK.name


def cells(path) -> list[dict]:
    return nbcells.read_notebook(path)['cells']


def new_ids_unique(cells_: list[dict]) -> bool:
    ids = [c['id'] for c in cells_]
    return len(set(ids)) == len(ids)

def write_back(cells_: list[tuple[str, str]], path, *donors):
    "Write `cells_` as text and back into `path` through the command line, as a user does; return the new cells."
    text = path.with_suffix('.txt')
    text.write_text(''.join(f"# %%{' [markdown]' if kind == 'markdown' else ''}\n{src}\n" for kind, src in cells_), encoding='utf-8')
    assert nbcells.main(['write', str(text), str(path), *(['--from', *map(str, donors)] if donors else [])]) == 0
    return cells(path)


def test_round_trip_is_byte_identical(nb_path, capsys):
    "Text out and straight back in leaves a clean notebook byte for byte as it was: every id, output and newline."
    before = nb_path.read_bytes()
    assert nbcells.main(['text', str(nb_path)]) == 0
    text = nb_path.with_suffix('.txt')
    text.write_text(capsys.readouterr().out, encoding='utf-8')
    assert nbcells.main(['write', str(text), str(nb_path)]) == 0
    assert nb_path.read_bytes() == before
    assert f"{len(cells(nb_path))} cells kept, 0 moved in, 0 new or changed" in capsys.readouterr().err


def test_text_format(nb_path):
    "Each cell is a `# %%` line (`# %% [markdown]` for prose) and its source, verbatim."
    nb = nbcells.read_notebook(nb_path)
    text = nbcells.to_text(nb)
    assert text.count('\n# %%') + 1 == len(nb['cells'])
    assert nbcells.parse_text(text) == [(c['cell_type'], nbcells.source(c)) for c in nb['cells']]
    with pytest.raises(ValueError, match='before the first'): nbcells.parse_text('stray\n# %%\nx = 1\n')


def test_changing_one_cell_changes_only_its_id(nb_path):
    "One edited cell gets a new id and loses its outputs; every other cell keeps id, outputs and metadata."
    before = cells(nb_path)
    edited = next(i for i, c in enumerate(before) if c['cell_type'] == 'code' and c.get('outputs'))
    pairs = [(c['cell_type'], nbcells.source(c)) for c in before]
    pairs[edited] = ('code', pairs[edited][1] + '\n# edited')
    after = write_back(pairs, nb_path)
    assert len(after) == len(before)
    for i, (old, new) in enumerate(zip(before, after)):
        if i == edited:
            assert new['id'] != old['id'] and new['outputs'] == [] and nbcells.source(new).endswith('# edited')
        else: assert new == old, i
    assert new_ids_unique(after)


def test_moved_cell_keeps_its_id(nb_path, tmp_path):
    "A cell moved from a donor notebook (`--from`) keeps its id and outputs there; an unmoved cell is new."
    donor = nb_path
    moved = next(c for c in cells(donor) if c['cell_type'] == 'code' and c.get('outputs'))
    target = tmp_path/'new.ipynb'
    after = write_back([('markdown', '# A new chapter'), ('code', nbcells.source(moved))], target, donor)
    assert after[1] == moved
    assert after[0]['id'] not in {c['id'] for c in cells(donor)}
    # without --from the same cell is new: a fresh id, no outputs
    fresh = write_back([('code', nbcells.source(moved))], tmp_path/'other.ipynb')
    assert fresh[0]['id'] != moved['id'] and fresh[0]['outputs'] == []


def test_identical_cells_keep_distinct_ids(nb_path):
    "Two cells with the same source are two cells: the first keeps the old id, the copy gets a fresh one."
    before = cells(nb_path)
    pairs = [(c['cell_type'], nbcells.source(c)) for c in before]
    after = write_back(pairs[:3] + [pairs[2]] + pairs[3:], nb_path)
    assert after[2]['id'] == before[2]['id'] and after[3]['id'] != before[2]['id']
    assert [c['id'] for c in after[:3] + after[4:]] == [c['id'] for c in before]
    assert new_ids_unique(after)


def test_new_cell_gets_a_fresh_unique_id(tmp_path):
    "A new notebook from text: every cell new, each with its own nbformat-valid id, and the cells as written."
    pairs = [('markdown', '# Title'), ('code', 'x = 1'), ('code', 'x = 1'), ('code', 'print(x)')]
    after = write_back(pairs, tmp_path/'fresh.ipynb')
    assert [(c['cell_type'], nbcells.source(c)) for c in after] == pairs
    assert new_ids_unique(after) and all(c['id'].isalnum() and 1 <= len(c['id']) <= 64 for c in after)
    assert all(c['outputs'] == [] and c['execution_count'] is None for c in after if c['cell_type'] == 'code')
    nb = json.loads((tmp_path/'fresh.ipynb').read_text())
    assert nb['nbformat'] == 4 and nb['nbformat_minor'] >= 5


def test_text_then_write_through_the_command_line(nb_path, capsys):
    "`text`, an edit with an editor, then `write`: the edited cell is new, the rest kept, and the counts say so."
    assert nbcells.main(['text', str(nb_path)]) == 0
    text = capsys.readouterr().out
    before = cells(nb_path)
    first_code = next(c for c in before if c['cell_type'] == 'code')
    src = nbcells.source(first_code)
    edited = text.replace(f"# %%\n{src}\n", f"# %%\n{src}\n# %% [markdown]\nA new note.\n", 1)
    assert edited != text
    (nb_path.parent/'edit.txt').write_text(edited, encoding='utf-8')
    assert nbcells.main(['write', str(nb_path.parent/'edit.txt'), str(nb_path)]) == 0
    assert f"{len(before)} cells kept, 0 moved in, 1 new or changed" in capsys.readouterr().err
    after = cells(nb_path)
    assert [c['id'] for c in after if nbcells.source(c) != 'A new note.'] == [c['id'] for c in before]
