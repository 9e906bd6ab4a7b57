"""The character-level language model on the standard library's source (`additive_pos_attn.text`): its corpus, its
characters and ids, bits per character computed by hand, and the `additive-pos-attn-lm` command, its one-line errors
and a short run end to end, in process."""
import io, math, re, sysconfig
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from additive_pos_attn.blocks import ATTENTION_KINDS
from additive_pos_attn.lm import PosTransformerLM
from additive_pos_attn.text import (TRAIN_MODULES, UNKNOWN_CHAR, VALID_MODULES, CharVocab, bits_per_char, main,
                                    module_source, random_batch, stdlib_text, text_parser, train_lm)

PROG = 'additive-pos-attn-lm'
SMALL = ['--steps', '3', '--context', '32', '--batch-size', '4', '--d-model', '16', '--heads', '2', '--layers', '1',
         '--length', '12']


@pytest.fixture(scope='module')
def corpus():
    train, valid = stdlib_text(), stdlib_text(VALID_MODULES)
    return train, valid, CharVocab.from_text(train)


def test_the_corpus_is_fixed_and_the_held_out_modules_are_disjoint(corpus):
    train, valid, _ = corpus
    assert stdlib_text() == train and stdlib_text(VALID_MODULES) == valid
    assert not set(TRAIN_MODULES) & set(VALID_MODULES)
    assert len(set(TRAIN_MODULES)) == len(TRAIN_MODULES) == 47 and len(VALID_MODULES) == 4
    assert train == '\n'.join(module_source(name) for name in TRAIN_MODULES)
    for name in VALID_MODULES: assert module_source(name) not in train
    assert len(train) > 500_000 and len(valid) > 50_000


def test_module_source_reads_the_stdlib_file():
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    assert module_source('textwrap') == (stdlib / 'textwrap.py').read_text(encoding='utf-8')
    assert module_source('json.decoder') == (stdlib / 'json' / 'decoder.py').read_text(encoding='utf-8')
    assert module_source('json') == (stdlib / 'json' / '__init__.py').read_text(encoding='utf-8')  # a package
    with pytest.raises(ValueError, match=r"name must be a pure-Python module of the standard library in .*, "
                                         r"got 'no_such_module'"):
        module_source('no_such_module')
    with pytest.raises(TypeError, match=r"name must be a module name, a str, got int"): module_source(3)
    with pytest.raises(TypeError, match=r"modules must be a sequence of module names, got the str 'json'"):
        stdlib_text('json')


def test_encode_decode_round_trip(corpus):
    train, valid, vocab = corpus
    assert vocab.chars == ''.join(sorted(set(train))) and len(vocab) == len(vocab.chars) + 1
    ids = vocab.encode(train[:20_000])
    assert ids.dtype == torch.long and vocab.decode(ids) == train[:20_000]
    assert vocab.decode(ids.tolist()) == train[:20_000]
    # an unseen character gets the unknown id, and decodes to the replacement character
    unseen = '\u2603'
    assert unseen not in vocab.chars
    assert vocab.encode(f'a{unseen}b').tolist() == [vocab.index['a'], vocab.unknown_id, vocab.index['b']]
    assert vocab.decode(vocab.encode(f'a{unseen}b')) == f'a{UNKNOWN_CHAR}b'
    assert (vocab.encode(valid) <= vocab.unknown_id).all()
    with pytest.raises(ValueError, match=r"chars must hold each character once, got 'xx'"): CharVocab('xx')
    with pytest.raises(TypeError, match=r"chars must be a str, got list"): CharVocab(['a'])


def test_random_batch_targets_are_the_next_ids():
    ids = torch.arange(50) * 3
    x, y = random_batch(ids, 5, 7, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (5, 7)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 3)
    with pytest.raises(ValueError, match=r"context must be a positive int, got 0"): random_batch(ids, 1, 0)


@pytest.mark.parametrize('context,length', [(8, 41), (8, 40), (16, 5), (64, 30)])
def test_bits_per_char_equals_the_sum_by_hand(context, length):
    "Non-overlapping windows of `context` ids, the last shorter: each id but the first predicted once, in bits."
    torch.manual_seed(0)
    model = PosTransformerLM(11, 16, 2, 1, attention='additive', max_len=64).eval()
    ids = torch.randint(0, 11, (length,))
    nats, count = 0., 0
    with torch.no_grad():
        for start in range(0, length - 1, context):
            window = ids[start:start + context + 1]
            logp = model(window[None, :-1]).log_softmax(-1)[0]
            nats -= logp[torch.arange(len(window) - 1), window[1:]].sum().item()
            count += len(window) - 1
    assert count == length - 1
    assert math.isclose(bits_per_char(model, ids, context), nats / count / math.log(2), rel_tol=1e-5)
    assert math.isclose(bits_per_char(model, ids, context, batch_size=1), nats / count / math.log(2), rel_tol=1e-5)
    with pytest.raises(ValueError, match=r"ids must be 1-D with 2 or more ids, got shape \(1,\)"):
        bits_per_char(model, ids[:1], context)


def test_training_is_reproducible_and_learns(corpus):
    train, _, vocab = corpus
    ids = vocab.encode(train[:50_000])
    kwargs = dict(steps=25, context=16, batch_size=8, d_model=16, num_heads=2, num_layers=1, lr=1e-2)
    (a, losses_a), (_, losses_b) = train_lm(ids, len(vocab), **kwargs), train_lm(ids, len(vocab), **kwargs)
    assert losses_a == losses_b and len(losses_a) == 25 and not a.training
    assert sum(losses_a[-5:]) < sum(losses_a[:5])


def parse_error(argv):
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    return err.getvalue()


@pytest.mark.parametrize('argv,message', [
    (['--steps', '-3'], "argument --steps: expected a positive integer, got -3"),
    (['--steps', 'ten'], "argument --steps: expected a positive integer, got 'ten'"),
    (['--context', '0'], "argument --context: expected a positive integer, got 0"),
    (['--seed', '-1'], "argument --seed: expected a non-negative integer, got -1"),
    (['--lr', '0'], "argument --lr: expected a positive number, got 0.0"),
    (['--temperature', 'hot'], "argument --temperature: expected a positive number, got 'hot'"),
    (['--top-p', '0'], "argument --top-p: expected a number in (0, 1], got 0.0"),
    (['--top-k', '0'], "argument --top-k: expected a positive integer, got 0"),
    (['--prompt', ''], "argument --prompt: expected a non-empty text, got ''"),
    (['--context', '16', '--prompt', 'class ', '--length', '12'],
     "argument --length: the prompt (6 characters) and the continuation must fit in --context 16, got 6 + 12"),
    (['--d-model', '30', '--heads', '4'], "argument --heads: expected a divisor of --d-model 30, got 4"),
    (['--stpes', '3'], "unrecognized arguments: --stpes 3"),
])
def test_argument_errors_are_one_line(argv, message):
    assert parse_error(argv) == f"{PROG}: error: {message}\n"


def test_attention_and_device_errors_are_one_line():
    err = parse_error(['--attention', 'xpos'])
    assert re.fullmatch(rf"{PROG}: error: argument --attention: invalid choice: 'xpos' \(choose from "
                        + ', '.join(f"'?{k}'?" for k in ATTENTION_KINDS) + r"\)\n", err), err
    err = parse_error(['--device', 'nonsense'])
    assert err.startswith(f"{PROG}: error: argument --device: expected a device available here, got 'nonsense' (")
    assert err.count('\n') == 1
    if not torch.cuda.is_available():
        err = parse_error(['--device', 'cuda'])
        assert err.startswith(f"{PROG}: error: argument --device: expected a device available here, got 'cuda' (")
        assert err.count('\n') == 1


def test_the_defaults():
    args = text_parser().parse_args([])
    assert (args.attention, args.steps, args.context, args.batch_size, args.d_model, args.layers, args.heads) == \
           ('rotary', 300, 128, 32, 128, 2, 4)
    assert (args.seed, args.device, args.prompt, args.length, args.temperature, args.top_k, args.top_p) == \
           (0, torch.device('cpu'), 'def ', 100, 0.8, None, 0.95)


@pytest.mark.parametrize('attention', ATTENTION_KINDS)
def test_the_command_end_to_end(attention):
    "A few steps of a small model: the corpus line, bits per character, both continuations; the bar on stderr."
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main([*SMALL, '--attention', attention, '--prompt', 'import ', '--top-k', '5']) == 0
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"corpus: 47 standard-library modules, [\d,]+ characters; held out: difflib, pprint, "
                        r"graphlib, reprlib, [\d,]+ characters; \d+ characters \+ unknown", lines[0]), lines[0]
    m = re.fullmatch(rf"{attention}: (\d+\.\d{{3}}) bits per character on the held-out modules after 3 steps "
                     r"\(\d+ s\)", lines[1])
    assert m, lines[1]
    assert 0 < float(m[1]) < 10
    assert lines[2] == '--- greedy ---'
    sampled = lines.index('--- sampled (temperature 0.8, top_k 5, top_p 0.95, seed 0) ---')
    assert lines[3].startswith('import ') and lines[sampled + 1].startswith('import ')
    greedy, sample = '\n'.join(lines[3:sampled]), '\n'.join(lines[sampled + 1:])
    assert len(greedy) == len(sample) == len('import ') + 12
    # stderr is not a terminal: the scheme's line, then the bar as whole lines, one per step for 3 steps
    assert '\r' not in err.getvalue()
    assert err.getvalue().splitlines()[0] == f'training {attention}, 3 steps'
    assert err.getvalue().splitlines()[-1].lstrip().startswith('100%')


def test_the_command_is_reproducible():
    runs = []
    for _ in range(2):
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()): main([*SMALL, '--seed', '3'])
        runs.append(re.sub(r'\(\d+ s\)', '', out.getvalue()))
    assert runs[0] == runs[1]
