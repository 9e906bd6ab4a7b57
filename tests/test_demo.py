"""The demo command as a user runs it: `python -m additive_pos_attn.demo --out DIR [--attention KIND]`, and its one-line
errors; the toy model and its training with each scheme."""
import io, os, re, shutil, subprocess, sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

FIGURES = ['training.png', 'pos_emb.png', 'pos_similarity.png', 'attention_maps.png', 'logit_terms.png']


# one tqdm line in a log: ` 10%|#         | 40/400 [00:00<00:07, 45.09step/s, loss=2.748]`
BAR = re.compile(r' *(\d+)%\|[# 0-9]{10}\| (\d+)/(\d+) \[.*\]')


def bar_counts(lines):
    "The step counts of tqdm's log lines, checking that each is one whole bar."
    counts = []
    for line in lines:
        m = BAR.fullmatch(line)
        assert m, f"not a whole progress line: {line!r}"
        counts.append(int(m[2]))
    return counts


def demo(*args, timeout=120):
    "Run the demo in a fresh interpreter; return the completed process."
    return subprocess.run([sys.executable, '-m', 'additive_pos_attn.demo', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def demo_in_process(capsys, *args):
    """`main(args)` in this process, as the command runs it but without an interpreter's start: `(exit status, stdout,
    stderr)`. The command line itself is `demo`'s, tested once (`test_demo_writes_the_figures`)."""
    from additive_pos_attn.demo import main
    try: code = main([*map(str, args)])
    except SystemExit as e: code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_writes_the_figures(tmp_path):
    "A short run trains both models, prints both accuracies and writes every figure as a PNG file."
    pytest.importorskip('matplotlib')
    out = tmp_path/'figures'  # created by the command
    res = demo('--out', out, '--steps', 20)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r'token accuracy with positions:    \d+\.\d%\n'
                        r'token accuracy without positions: \d+\.\d% \(best possible without positions: 6\.7%\)\n'
                        r'wrote training.png, pos_emb.png, pos_similarity.png, attention_maps.png, logit_terms.png to .* in \d+\.\d s\n',
                        res.stdout), res.stdout
    # stderr is a pipe, not a terminal: each model's bar is a line at the start and one every 2 steps, no redraws
    assert '\r' not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == 'training with positions, 20 steps' and lines[12] == 'training without positions, 20 steps'
    assert bar_counts(lines[1:12]) == bar_counts(lines[13:]) == list(range(0, 21, 2))
    for name in FIGURES:
        path = out/name
        assert path.is_file() and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name


@pytest.mark.parametrize('attention', ['relative', 'rotary', 'alibi'])
def test_demo_with_another_scheme(tmp_path, capsys, attention):
    "`--attention` trains that scheme, with and without positions, and writes the two figures that picture any attention."
    pytest.importorskip('matplotlib')
    code, stdout, stderr = demo_in_process(capsys, '--out', tmp_path, '--steps', 10, '--attention', attention)
    assert code == 0, stderr
    aligned = ' ' * (len(f'with {attention} positions') - len('without positions'))  # the accuracies line up
    assert re.fullmatch(rf'token accuracy with {attention} positions: \d+\.\d%\n'
                        rf'token accuracy without positions:{aligned} \d+\.\d% \(best possible without positions: 6\.7%\)\n'
                        r'wrote training.png, attention_maps.png to .*\n', stdout), stdout
    lines = stderr.splitlines()
    assert lines[0] == f'training with {attention} positions, 10 steps' and lines[12] == 'training without positions, 10 steps'
    assert sorted(path.name for path in tmp_path.iterdir()) == ['attention_maps.png', 'training.png']
    for path in tmp_path.iterdir(): assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', path


def test_unknown_attention_is_a_one_line_error(tmp_path, capsys):
    code, stdout, stderr = demo_in_process(capsys, '--out', tmp_path, '--attention', 'xpos')
    assert code == 2 and stdout == '' and list(tmp_path.iterdir()) == []
    # Python 3.12.8 and later name the choices without quotes
    assert re.fullmatch(r"additive-pos-attn-demo: error: argument --attention: invalid choice: 'xpos' "
                        r"\(choose from '?additive'?, '?relative'?, '?rotary'?, '?alibi'?\)\n", stderr), stderr


@pytest.mark.parametrize('attention', ['additive', 'relative', 'rotary', 'alibi', 'none'])
def test_each_scheme_trains_reproducibly(attention):
    "Every scheme trains, from the same initial weights for one seed but for its positional parameters, and reproducibly."
    import torch
    from additive_pos_attn.demo import ToyModel, train_toy, toy_accuracy
    (a, losses_a), (b, losses_b) = (train_toy(20, attention=attention, d_model=8, num_heads=2) for _ in range(2))
    assert a.attention == attention and losses_a == losses_b and len(losses_a) == 20
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(p, q), name
    assert 0 <= toy_accuracy(a, n=100) <= 1
    torch.manual_seed(0); fresh = ToyModel(attention=attention)
    torch.manual_seed(0); additive = ToyModel()
    for name, value in fresh.state_dict().items():
        if name in additive.state_dict(): assert torch.equal(value, additive.state_dict()[name]), name


def test_schemes_past_the_table():
    "Relative, rotary, ALiBi and no positions take sequences longer than max_len; the table refuses them, naming the limit."
    import torch
    from additive_pos_attn.demo import ToyModel
    tokens = torch.randint(0, 16, (2, 24))
    for attention in ('relative', 'rotary', 'alibi', 'none'): assert ToyModel(attention=attention)(tokens).shape == (2, 24, 16)
    with pytest.raises(ValueError, match=r'sequence length for q_positions is 24, which exceeds max_len=16'): ToyModel()(tokens)


def test_a_task_of_ones_own_skips_tokens_without_a_target():
    "Targets of -100 count neither in the loss nor in the accuracy."
    import torch
    from additive_pos_attn.demo import train_toy, toy_accuracy

    def first_token_everywhere(batch_size, generator=None):
        tokens = torch.randint(0, 16, (batch_size, 6), generator=generator)
        targets = tokens[:, :1].expand(-1, 6).clone()
        targets[:, 3:] = -100
        return tokens, targets
    model, losses = train_toy(150, task=first_token_everywhere, attention='relative', d_model=16, num_heads=2)
    assert losses[-1] < 0.1
    assert toy_accuracy(model, task=first_token_everywhere, n=200) == 1.0


@pytest.mark.parametrize('args, message', [
    (['--steps', '-3'], 'argument --steps: expected a positive integer, got -3'),
    (['--steps', '0'], 'argument --steps: expected a positive integer, got 0'),
    (['--seed', '-1'], 'argument --seed: expected a non-negative integer, got -1'),
])
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, args, message):
    code, stdout, stderr = demo_in_process(capsys, '--out', tmp_path, *args)
    assert code == 2
    assert stderr == f'additive-pos-attn-demo: error: {message}\n'
    assert stdout == '' and list(tmp_path.iterdir()) == []


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    "A directory that cannot be made (its parent is a file) is refused before any training."
    blocker = tmp_path/'file'
    blocker.write_text('not a directory')
    code, _, stderr = demo_in_process(capsys, '--out', blocker/'figures')
    assert code == 2
    assert stderr.count('\n') == 1
    assert stderr.startswith(f"additive-pos-attn-demo: error: argument --out: cannot write to '{blocker/'figures'}'")


def test_missing_out_is_a_one_line_error(capsys):
    code, _, stderr = demo_in_process(capsys)
    assert code == 2
    assert stderr == 'additive-pos-attn-demo: error: the following arguments are required: --out\n'


def test_console_script(tmp_path):
    "The installed console script is the same command."
    script = shutil.which('additive-pos-attn-demo') or str(Path(sys.executable).parent/'additive-pos-attn-demo')
    if not Path(script).exists(): pytest.skip('console script not installed (pip install -e .)')
    res = subprocess.run([script, '--out', tmp_path, '--steps', '-1'], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith('additive-pos-attn-demo: error: argument --steps')


@pytest.mark.parametrize('missing', ['matplotlib', 'tqdm'])
def test_missing_viz_extra_is_a_one_line_error(tmp_path, missing):
    "Without matplotlib or tqdm (the `viz` extra) the command says what to install, in one line, before training."
    code = (f"import sys; sys.modules[{missing!r}] = None\n"  # `import {missing}` now raises ImportError
            "from additive_pos_attn.demo import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, '-c', code, '--out', str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.count('\n') == 1 and missing in res.stderr and 'additive_pos_attn[viz]' in res.stderr
    assert 'training' not in res.stderr


def test_training_without_a_bar_needs_no_tqdm():
    "The module imports, and trains, with torch alone; only `progress=True` imports tqdm."
    code = ("import sys; sys.modules['tqdm'] = sys.modules['matplotlib'] = None\n"
            "from additive_pos_attn.demo import train_toy\n"
            "seen = []; train_toy(3, progress=lambda step, loss: seen.append(step), d_model=8, num_heads=2)\n"
            "assert seen == [1, 2, 3], seen\n"
            "try: train_toy(3, progress=True)\n"
            "except ImportError as e: print('ImportError', e.name)\n")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == 'ImportError tqdm\n'


def train_script(steps):
    "A fresh interpreter that trains a small model for `steps` steps with `progress=True`."
    return [sys.executable, '-c', f"from additive_pos_attn.demo import train_toy; train_toy({steps}, progress=True, d_model=8, num_heads=2)"]


@pytest.mark.parametrize('steps, counts', [
    (300, list(range(0, 301, 30))),                   # the start, then every tenth
    (457, list(range(0, 457, 46)) + [457]),           # every 46 steps, and the last step, always
    (7, list(range(8))),                              # a short run: every step
])
def test_progress_in_a_log_is_a_few_lines(tmp_path, steps, counts):
    """Written to a log file (not a terminal: `sys.stderr` redirected to a file, which `train_toy` writes to as it is
    at the call), a run's progress is at most 11 whole lines, never a line of redraws."""
    from additive_pos_attn.demo import train_toy
    log = tmp_path/'train.log'
    with open(log, 'w') as f, redirect_stderr(f): train_toy(steps, progress=True, d_model=8, num_heads=2)
    text = log.read_text()
    assert '\r' not in text and text.endswith('\n')
    lines = text.splitlines()
    assert len(lines) <= 11 and bar_counts(lines) == counts
    assert re.search(r'loss=\d+\.\d{3}\]$', lines[-1])


def test_progress_bar_in_process_goes_to_stderr():
    "`train_toy(progress=True)` writes to `sys.stderr` as it is at the call, so a redirect catches it."
    err = io.StringIO()
    with redirect_stderr(err):
        from additive_pos_attn.demo import train_toy
        _, losses = train_toy(200, progress=True, d_model=8, num_heads=2, batch_size=8)
    lines = err.getvalue().splitlines()
    assert bar_counts(lines) == list(range(0, 201, 20))
    assert lines[-1].endswith(f'loss={losses[-1]:.3f}]')


def test_progress_on_a_terminal_is_redrawn_in_place():
    "On a terminal (a pseudo-terminal 100 columns wide) the bar is one line, redrawn with `\\r`, ended once."
    pty, fcntl, termios, struct = (pytest.importorskip(m) for m in ('pty', 'fcntl', 'termios', 'struct'))
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
    proc = subprocess.Popen(train_script(300), stdout=child_fd, stderr=child_fd)
    os.close(child_fd)
    out = b''
    while True:
        try: chunk = os.read(main_fd, 65536)
        except OSError: break  # the child has gone: EIO on Linux
        if not chunk: break
        out += chunk
    os.close(main_fd)
    assert proc.wait(timeout=120) == 0, out
    text = out.decode().replace('\r\n', '\n')  # the terminal turns '\n' into '\r\n'
    assert text.count('\n') == 1 and text.endswith('\n')
    redraws = text.rstrip('\n').split('\r')[1:]
    assert len(redraws) >= 3 and '300/300' in redraws[-1] and redraws[0].strip().startswith('0%')


def test_progress_callable():
    "A callable `progress` is called with `(step, loss)` after every step, and nothing is drawn."
    from additive_pos_attn.demo import train_toy
    seen, err = [], io.StringIO()
    with redirect_stderr(err): _, losses = train_toy(5, progress=lambda step, loss: seen.append((step, loss)), d_model=8, num_heads=2)
    assert seen == list(zip(range(1, 6), losses)) and err.getvalue() == ''


# Generating: the encoder-decoder and greedy decoding with caches

@pytest.mark.parametrize('attention', ['additive', 'relative', 'rotary', 'alibi'])
def test_generate_with_caches_is_recomputation(attention, device):
    "Greedy decoding with caches gives the tokens and, in float64, the logits of recomputing the output at every step."
    import torch
    from additive_pos_attn.demo import ToySeq2Seq, reversal_batch, seq2seq_generate as generate
    from additive_pos_attn.blocks import positional_parameters
    torch.manual_seed(0)
    model = ToySeq2Seq(attention=attention, num_layers=2).double().to(device).eval()
    with torch.no_grad():  # positions that matter, as after training
        for module in model.modules():
            if hasattr(module, 'attn'): [p.normal_() for p in positional_parameters(module).values()]
    source, _ = reversal_batch(8, 16, torch.Generator().manual_seed(1))
    (tokens, logits), (tokens_ref, logits_ref) = (generate(model, source.to(device), cache=c) for c in (True, False))
    assert tokens.shape == (8, 16) and logits.shape == (8, 16, 16)
    assert torch.equal(tokens, tokens_ref)
    assert (logits - logits_ref).abs().max().item() <= 1e-12
    short, _ = generate(model, source.to(device), 5)
    assert torch.equal(short, tokens[:, :5])


def test_seq2seq_trains_reproducibly_and_learns():
    "One seed gives one model (twice 20 steps: the same); 250 steps already generate the reversals with the additive table."
    import torch
    from additive_pos_attn.demo import reversal_batch, seq2seq_generate as generate, train_seq2seq
    (a, losses_a), (b, losses_b) = train_seq2seq(20), train_seq2seq(20)
    assert losses_a == losses_b and not a.training
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(p, q), name
    a, _ = train_seq2seq(250)
    source, expected = reversal_batch(200, 16, torch.Generator().manual_seed(5))
    assert (generate(a, source)[0] == expected).float().mean() > 0.99
    with pytest.raises(ValueError, match=r"steps must be a positive int, got 0"): generate(a, source, 0)
    with pytest.raises(ValueError, match=r"attention must be one of 'additive', 'relative', 'rotary', 'alibi', got 'none'"):
        train_seq2seq(1, attention='none')
