"""The package as users get it: the wheel, and the notebooks as the single source of the module and README."""
import filecmp, re, shutil, subprocess, sys, venv
from importlib.metadata import version
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

def run(*cmd, cwd=ROOT, timeout=600, **kw):
    "Run `cmd`, fail the test with its output if it fails."
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout

def project_copy(tmp_path: Path) -> Path:
    "The sources nbdev reads, copied, so a command can run on them without touching the checkout."
    dst = tmp_path/'project'
    dst.mkdir()
    shutil.copy(ROOT/'settings.ini', dst)
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copytree(ROOT/'additive_pos_attn', dst/'additive_pos_attn', ignore=shutil.ignore_patterns('__pycache__'))
    return dst

def tree_diff(a: Path, b: Path, pattern: str) -> list:
    "Files matching `pattern` that differ, or exist on one side only."
    names = {p.relative_to(a) for p in a.rglob(pattern)} | {p.relative_to(b) for p in b.rglob(pattern)}
    return sorted(str(n) for n in names if not ((a/n).exists() and (b/n).exists() and filecmp.cmp(a/n, b/n, shallow=False)))

def test_export_leaves_module_unchanged(tmp_path):
    "The committed module is exactly what the notebooks export."
    copy = project_copy(tmp_path)
    run(Path(sys.executable).parent/'nbdev_export', cwd=copy)
    assert tree_diff(ROOT/'additive_pos_attn', copy/'additive_pos_attn', '*.py') == [], "run nbdev_export and commit the module"

def test_clean_leaves_notebooks_unchanged(tmp_path):
    "The committed notebooks are already clean."
    copy = project_copy(tmp_path)
    run(Path(sys.executable).parent/'nbdev_clean', cwd=copy)
    assert tree_diff(ROOT/'nbs', copy/'nbs', '*.ipynb') == [], "run nbdev_clean and commit the notebooks"

def test_readme_matches_index():
    "README.md is what tools/make_readme.py makes of nbs/index.ipynb."
    run(sys.executable, 'tools/make_readme.py', '--check')

def _torch_alone(folder: Path) -> Path:
    """`folder` filled with links to the torch in use and to its own requirements, nothing else: what a fresh environment
    gets from `pip install torch` (the same files), without copying a gigabyte of them."""
    from importlib.metadata import distribution
    from packaging.requirements import Requirement
    folder.mkdir()
    seen, todo = set(), ['torch']
    while todo:
        dist = distribution(todo.pop())
        if dist.metadata['Name'].lower() in seen: continue
        seen.add(dist.metadata['Name'].lower())
        todo += [r.name for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({'extra': ''})]
        for top in {f.parts[0] for f in dist.files if f.parts[0] != '..'}:
            if not (folder/top).exists(): (folder/top).symlink_to(dist.locate_file(top))
    return folder

def test_wheel_installs_without_dev_extras(tmp_path):
    "The wheel installs into a fresh virtual environment with its requirements alone (torch, fastcore), and runs there."
    run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-w', tmp_path/'dist', ROOT)
    wheel, = (tmp_path/'dist').glob('additive_pos_attn-*.whl')
    env_dir = tmp_path/'venv'
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip is this one, run for the environment's interpreter (--python)
    py = env_dir/'bin'/'python'
    # the torch already in use (so that a CPU-only machine gets no CUDA build), and its requirements, through a .pth file
    site, = env_dir.glob('lib/python*/site-packages')
    (site/'torch_alone.pth').write_text(f"{_torch_alone(tmp_path/'torch')}\n")
    pip = lambda *args: run(sys.executable, '-m', 'pip', '--python', py, *args)
    pip('install', '-q', wheel)
    installed = pip('list', '--format=freeze').lower()
    assert 'torch==' in installed and 'fastcore==' in installed  # fastcore's @patch grows the classes
    for dev_only in ('nbdev', 'execnb', 'matplotlib', 'tqdm', 'pyyaml', 'pytest', 'hypothesis'):
        assert f"\n{dev_only}==" not in f"\n{installed}", f"{dev_only} was installed without the dev extras"
    script = ("import torch, additive_pos_attn as apa\n"
              "from additive_pos_attn import AdditivePosMultiheadAttention, PositionalAttentionBase\n"
              "layer = AdditivePosMultiheadAttention(8, 2, max_len=16)\n"
              "x = torch.randn(2, 5, 8)\n"
              "out, w = layer(x, x, x, q_positions=torch.arange(5), need_weights=True, is_causal=True)\n"
              "assert out.shape == (2, 5, 8) and w.shape == (2, 5, 5)\n"
              "assert torch.allclose(out, layer.attn(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))[0], atol=1e-6)\n"
              "print(apa.__version__, apa.__file__)\n")
    out = run(py, '-c', script, cwd=tmp_path)
    assert str(env_dir) in out and out.split()[0] == version('additive_pos_attn')

# torch's process-wide state that importing a library must leave alone: its global hook registries (those this torch has)
GLOBAL_HOOKS = {'torch.optim.optimizer': ['_global_optimizer_pre_hooks', '_global_optimizer_post_hooks'],
                'torch.nn.modules.module': ['_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
                                            '_global_backward_pre_hooks', '_global_module_registration_hooks',
                                            '_global_parameter_registration_hooks', '_global_buffer_registration_hooks']}
SIDE_EFFECTS = f'''
import importlib, json, pkgutil, sys
import torch

def state():
    out = {{}}
    for module, names in {GLOBAL_HOOKS!r}.items():
        module = importlib.import_module(module)
        for name in names:
            if hasattr(module, name): out[module.__name__ + '.' + name] = [len(getattr(module, name)), sorted(map(repr, getattr(module, name)))]
    out.update(default_dtype=str(torch.get_default_dtype()), deterministic=torch.are_deterministic_algorithms_enabled(),
               deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
               threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
               grad_enabled=torch.is_grad_enabled(), matmul_precision=torch.get_float32_matmul_precision())
    return out

before = state()
import additive_pos_attn
modules = [importlib.import_module('additive_pos_attn.' + m.name).__name__ for m in pkgutil.iter_modules(additive_pos_attn.__path__)]
print(json.dumps(dict(before=before, after=state(), modules=modules)))
'''

def test_import_has_no_side_effects():
    "Importing the package and every submodule, in a fresh interpreter, registers no global torch hook and changes no torch setting."
    import json
    res = json.loads(run(sys.executable, '-c', SIDE_EFFECTS))
    before, after = res['before'], res['after']
    assert {'additive_pos_attn.demo', 'additive_pos_attn.viz'} <= set(res['modules'])
    assert any(k.endswith('_global_optimizer_post_hooks') for k in before) and any(k.endswith('_global_forward_hooks') for k in before)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"importing additive_pos_attn changed torch's global state (before, after): {changed}"


# private torch names (`torch._C`, `torch._dynamo`, the global hook registries) are reached in one module only
PRIVATE_TORCH = re.compile(r'torch\._|nn\.modules\.module\._global|nn\.modules\.module import[^\n]*\b_global')

def test_private_torch_only_in_compat():
    "No module of the package but `_compat.py` names torch's private API, so a torch upgrade is checked in one place."
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT/'additive_pos_attn').rglob('*.py')) if path.name != '_compat.py'
             for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1) if PRIVATE_TORCH.search(line)]
    assert not found, "private torch API outside additive_pos_attn/_compat.py:\n" + '\n'.join(found)
