"""benchmarks/scaling.py, how cost grows with length: the causal floor is causal attention (float64, to 1e-12, against
bare `nn.MultiheadAttention` with the causal mask), a case that runs out of memory becomes a skipped row and not a
crash, `summary` reads slopes and ratios from rows (synthetic rows whose slopes are known), `figure` draws them; and,
marked slow, the script's smoke run writes the rows it documents."""
import importlib.util, json, math, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'scaling.py'


def _load():
    spec = importlib.util.spec_from_file_location('scaling', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

scaling = _load()
MODES = scaling.MODES
OOM = ("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
       "you tried to allocate 1073741824 bytes.")  # torch's CPU allocator's message, as a failed allocation gives it


def test_causal_floor_is_causal_attention():
    "The floor computes bare MHA with the causal mask (float64, 1e-12), and no output reads a later token."
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    want = attn(x, x, x, attn_mask=scaling.causal_mask(8), need_weights=False)[0]
    torch.testing.assert_close(scaling.causal_floor_attention(attn, x), want, rtol=1e-12, atol=1e-12)
    later = x.clone()
    later[:, 5:] = torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(scaling.causal_floor_attention(attn, later)[:, :5], want[:, :5], rtol=1e-12, atol=1e-12)


def _oom(): raise RuntimeError(OOM)


def test_probe_drops_what_runs_out_of_memory():
    "An allocation failure moves the statement to `skipped` with the allocator's line; any other error propagates."
    stmts, skipped = {'big': _oom, 'small': lambda: None}, {}
    scaling.probe(stmts, skipped)
    assert list(stmts) == ['small']
    assert skipped['big'] == f'out of memory at its first call: {OOM}'
    assert scaling.out_of_memory(MemoryError()) and not scaling.out_of_memory(RuntimeError('shape mismatch'))
    def bug(): raise ValueError('not memory')
    with pytest.raises(ValueError, match='not memory'): scaling.probe({'bad': bug}, {})


@pytest.fixture
def tiny():
    "A tiny case, one short round: (B, T, D, H) = (2, 8, 16, 2), the relative and rotary layers."
    classes = scaling.layer_classes(['relative', 'rotary'])
    opts = dict(rounds=1, min_run_time=0.001, num_threads=1)
    return lambda mode: scaling.run_case(classes, (2, 8, 16, 2), mode, opts, scaling.clock('cpu', 'wall'))


def _failing(monkeypatch, *names):
    "Make `implementations` hand out callables for `names` that run out of memory."
    real = scaling.implementations
    monkeypatch.setattr(scaling, 'implementations', lambda *a: {**real(*a), **{n: _oom for n in names}})


def test_a_layer_out_of_memory_is_a_skipped_row(tiny, monkeypatch):
    "The layer that runs out of memory keeps a row with the reason; the other and the floor are timed and counted."
    _failing(monkeypatch, 'relative')
    relative, rotary = tiny('forward+backward')
    assert relative['skipped'].startswith('out of memory at its first call') and 'layer_ms' not in relative
    assert rotary['layer_ms'] > 0 and rotary['layer_vs_floor'] > 0 and rotary['floor'] in ('mha', 'floor')
    assert rotary['layer_saved_btd'] > 0 and rotary['floor_saved_btd'] > 0 and 'skipped' not in rotary
    assert relative['floor_ms_min'] == rotary['floor_ms_min'] and relative['T'] == 8 and relative['tokens'] == 16


def test_no_floor_skips_every_layer(tiny, monkeypatch):
    "Both baselines out of memory: nothing to compare with, every row skipped, saying why."
    _failing(monkeypatch, 'mha', 'floor')
    rows = tiny('forward')
    assert all(r['skipped'].startswith('no floor: mha out of memory') and 'layer_ms' not in r for r in rows)
    assert set(rows[0]['baselines_skipped']) == {'mha', 'floor'}


LENGTHS = (128, 256, 512, 1024)


def synthetic_rows():
    """Rows as the script writes them, with known slopes: the floor grows as T, 'relative' as T² (saving T/32 + 5
    units), 'rotary' at 1.1 times the floor; 'alibi' skipped at T=1024 in training."""
    rows = []
    for T in LENGTHS:
        for mode in MODES:
            floor = 0.01 * T * (3 if mode == MODES[1] else 1)
            common = dict(device='cpu', dtype='float32', B=8192 // T, T=T, D=256, H=8, tokens=8192, attention='self',
                          causal=True, mode=mode, rounds=2, floor='floor', floor_ms_min=floor, mha_ms=1.2 * floor,
                          floor_ms=floor)
            if mode == MODES[1]: common.update(btd_bytes=8 * 2**20, floor_saved_btd=5.0)
            for name, ms in (('relative', 1e-5 * T * T), ('rotary', 1.1 * floor), ('alibi', 1.05 * floor)):
                row = dict(layer=name, **common)
                if name == 'alibi' and T == 1024 and mode == MODES[1]:
                    rows.append(dict(row, skipped=f'out of memory at its first call: {OOM}'))
                    continue
                row.update(layer_ms=ms, layer_vs_floor=ms / floor, layer_vs_floor_quartiles=[ms / floor, ms / floor])
                if mode == MODES[1]: row.update(layer_saved_btd=T / 32 + 5 if name == 'relative' else 6.0)
                rows.append(row)
    return rows


def test_slopes():
    "The fitted slope and the last step's, on points of known slope; None under two lengths."
    pts = [(T, 3e-4 * T**2) for T in LENGTHS]
    assert math.isclose(scaling.slope(pts), 2.0) and math.isclose(scaling.end_slope(pts), 2.0)
    assert math.isclose(scaling.slope([(128, 1.0), (256, 1.0), (512, 8.0)]), 1.5)
    assert scaling.slope(pts[:1]) is None and scaling.end_slope(pts[:1]) is None


def test_summary_reads_slopes_ratios_and_skips():
    lines = scaling.summary(synthetic_rows()).splitlines()
    assert ('floor, eval: slope 1.00 (fit over T=128 to 1024; 1.00 from T=512 to 1024); 1.28 ms at T=128, '
            '10.24 ms at T=1024') in lines
    assert 'floor, saved for backward: 5.00 (B, T, D) at T=128, 5.00 at T=1024' in lines
    relative = next(line for line in lines if line.startswith('relative, training'))
    assert relative.startswith('relative, training: slope 2.00') and 'at T=128, 0.34 at T=1024' in relative
    assert relative.endswith('saved for backward 9.00 (B, T, D) at T=128, 37.00 at T=1024')
    rotary = next(line for line in lines if line.startswith('rotary, eval'))
    assert rotary.startswith('rotary, eval: slope 1.00') and '1.10 times the floor at T=128, 1.10 at T=1024' in rotary
    assert any(line.startswith('alibi, training: slope 1.00 (fit over T=128 to 512;') for line in lines)
    assert lines[-1] == f'skipped: alibi at T=1024, forward+backward: out of memory at its first call: {OOM}'


def test_tables_have_a_line_a_row():
    rows = synthetic_rows()
    assert len(scaling.markdown_table(rows).splitlines()) == len(rows) + 2
    assert '| relative | (8, 1024, 256, 8) | training | 10.49 | 30.72 | floor | 0.341 |' in scaling.markdown_table(rows)


def test_figure_draws_time_and_memory_against_length():
    "Three log-log panels (eval, training, saved for backward), a line a layer and the floor's, skips in the legend."
    rows = synthetic_rows()
    fig = scaling.figure(rows)
    axes = fig.get_axes()
    assert len(axes) == 3 and all(ax.get_xscale() == 'log' and ax.get_yscale() == 'log' for ax in axes)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert labels[0] == ['relative', 'rotary', 'alibi', 'floor (no positions)', 'slope 1: grows as T^1',
                         'slope 2: grows as T^2']
    assert 'alibi (skipped at T=1024)' in labels[1] and 'alibi (skipped at T=1024)' in labels[2]
    relative = next(line for line in axes[0].get_lines() if line.get_label() == 'relative')
    assert list(relative.get_xdata()) == list(LENGTHS) and list(relative.get_ydata()) == [1e-5 * T * T for T in LENGTHS]
    saved = next(line for line in axes[2].get_lines() if line.get_label() == 'relative')
    assert list(saved.get_ydata()) == [T / 32 + 5 for T in LENGTHS]


@pytest.mark.slow
def test_smoke_run_writes_its_rows(tmp_path):
    "`--quick --lengths 128 256 --layers rotary`: a row a length and mode, timed against the causal floor, saved bytes."
    out = tmp_path / 'scaling.json'
    run = subprocess.run([sys.executable, str(SCRIPT), '--quick', '--lengths', '128', '256', '--layers', 'rotary',
                          '--json', str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    rows, meta = results['rows'], results['meta']
    assert [(r['layer'], r['T'], r['mode']) for r in rows] == [('rotary', T, m) for T in (128, 256) for m in MODES]
    assert meta['quick'] and meta['layers'] == ['rotary'] and meta['lengths'] == [128, 256] and meta['tokens'] == 8192
    assert meta['threads'] == 1 and meta['timer'] == 'process' and 'memory' in meta
    for r in rows:
        assert (r['B'] * r['T'], r['D'], r['H'], r['causal'], r['rounds']) == (8192, 256, 8, True, 2)
        assert 'skipped' not in r and r['layer_ms'] > 0 and r['floor'] in ('mha', 'floor')
        assert r['floor_ms_min'] == min(r['mha_ms'], r['floor_ms'])
        assert 0.5 < r['layer_vs_floor'] < 5 and len(r['layer_vs_floor_quartiles']) == 2
        training = r['mode'] == 'forward+backward'
        assert training == ('layer_saved_btd' in r) == ('floor_saved_btd' in r)
        if training: assert r['layer_saved_btd'] >= r['floor_saved_btd'] > 1 and r['btd_bytes'] == 8192 * 256 * 4
    assert 'rotary, eval: slope' in run.stdout and 'floor, training: slope' in run.stdout
