"""The demo command as a user runs it: `python -m additive_pos_attn.demo --out DIR`, and its one-line errors."""
import shutil, subprocess, sys
from pathlib import Path

import pytest

FIGURES = ['training.png', 'pos_emb.png', 'pos_similarity.png', 'attention_maps.png', 'logit_terms.png']


def demo(*args, timeout=120):
    "Run the demo in a fresh interpreter; return the completed process."
    return subprocess.run([sys.executable, '-m', 'additive_pos_attn.demo', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_demo_writes_the_figures(tmp_path):
    "A short run trains both models, prints both accuracies and writes every figure as a PNG file."
    pytest.importorskip('matplotlib')
    out = tmp_path/'figures'  # created by the command
    res = demo('--out', out, '--steps', 20)
    assert res.returncode == 0, res.stderr
    assert 'token accuracy with positions:' in res.stdout and 'token accuracy without positions:' in res.stdout
    assert 'step 20/20' in res.stderr  # the progress bar
    for name in FIGURES:
        path = out/name
        assert path.is_file() and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name


@pytest.mark.parametrize('args, message', [
    (['--steps', '-3'], 'argument --steps: expected a positive integer, got -3'),
    (['--steps', '0'], 'argument --steps: expected a positive integer, got 0'),
    (['--seed', '-1'], 'argument --seed: expected a non-negative integer, got -1'),
])
def test_bad_numbers_are_one_line_errors(tmp_path, args, message):
    res = demo('--out', tmp_path, *args)
    assert res.returncode == 2
    assert res.stderr == f'additive-pos-attn-demo: error: {message}\n'
    assert res.stdout == '' and list(tmp_path.iterdir()) == []


def test_unwritable_out_is_a_one_line_error(tmp_path):
    "A directory that cannot be made (its parent is a file) is refused before any training."
    blocker = tmp_path/'file'
    blocker.write_text('not a directory')
    res = demo('--out', blocker/'figures')
    assert res.returncode == 2
    assert res.stderr.count('\n') == 1
    assert res.stderr.startswith(f"additive-pos-attn-demo: error: argument --out: cannot write to '{blocker/'figures'}'")


def test_missing_out_is_a_one_line_error():
    res = demo()
    assert res.returncode == 2
    assert res.stderr == 'additive-pos-attn-demo: error: the following arguments are required: --out\n'


def test_console_script(tmp_path):
    "The installed console script is the same command."
    script = shutil.which('additive-pos-attn-demo') or str(Path(sys.executable).parent/'additive-pos-attn-demo')
    if not Path(script).exists(): pytest.skip('console script not installed (pip install -e .)')
    res = subprocess.run([script, '--out', tmp_path, '--steps', '-1'], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith('additive-pos-attn-demo: error: argument --steps')


def test_missing_matplotlib_is_a_one_line_error(tmp_path):
    "Without matplotlib (the `viz` extra) the command says what to install, in one line, before training."
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` now raises ImportError
            "from additive_pos_attn.demo import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, '-c', code, '--out', str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.count('\n') == 1 and 'matplotlib' in res.stderr and 'additive_pos_attn[viz]' in res.stderr
    assert 'training' not in res.stderr
