"""The GitHub Actions workflows, which cannot run here: their structure, and that CI runs the README's own commands."""
import re
from configparser import ConfigParser
from pathlib import Path

import pytest

import yaml  # PyYAML, in the dev extra: a missing one fails, never skips

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT/'.github'/'workflows'
CPU_INDEX = 'https://download.pytorch.org/whl/cpu'


def workflow(name: str) -> dict:
    "A workflow file, parsed. YAML 1.1 reads the key `on` as the boolean True: it is stored back under 'on'."
    wf = yaml.safe_load((WORKFLOWS/name).read_text(encoding='utf-8'))
    if True in wf: wf['on'] = wf.pop(True)
    return wf


def readme_command(marker: str) -> str:
    "The fenced block after `<!-- marker -->` in README.md, as .ci/run reads it."
    m = re.search(rf'^<!-- {marker} -->\n```[^\n]*\n(.*?)\n```', (ROOT/'README.md').read_text(encoding='utf-8'), re.S | re.M)
    assert m, f"README.md lacks its <!-- {marker} --> block"
    return m[1].strip()


def settings() -> dict:
    config = ConfigParser(delimiters=['='])
    config.read(ROOT/'settings.ini', encoding='utf-8')
    return config['DEFAULT']


def steps(wf: dict) -> list[dict]:
    "Every step of every job, in order."
    return [step for job in wf['jobs'].values() for step in job['steps']]


def runs(job: dict) -> list[str]:
    "The `run` scripts of a job's steps, in order, stripped; '' for a step that `uses` an action."
    return [step.get('run', '').strip() for step in job['steps']]


def index_of(job: dict, predicate, what: str) -> int:
    found = [i for i, step in enumerate(job['steps']) if predicate(step)]
    assert found, f"no step {what}"
    return found[0]


def uses(action: str):
    return lambda step: step.get('uses', '').split('@')[0] == action


def installs_cpu_torch(step: dict) -> bool:
    return bool(re.search(rf'pip install torch==[\d.]+ --index-url {re.escape(CPU_INDEX)}\b', step.get('run', '')))


@pytest.fixture(params=['test.yaml', 'deploy.yaml'])
def any_workflow(request) -> dict:
    return workflow(request.param)


def test_every_step_uses_an_action_or_runs_a_command(any_workflow):
    assert any_workflow['name'] and any_workflow['jobs']
    for job in any_workflow['jobs'].values():
        assert job['runs-on'] == 'ubuntu-latest' and job['steps']
    for step in steps(any_workflow):
        assert ('uses' in step) != ('run' in step), step
        if 'uses' in step: assert re.fullmatch(r'[\w.-]+/[\w./-]+@[\w.-]+', step['uses']), f"unpinned action: {step['uses']}"
        else: assert step['run'].strip(), step


def test_checkout_and_python_come_first(any_workflow):
    for name, job in any_workflow['jobs'].items():
        if any('run' in step for step in job['steps']):
            assert [s.get('uses', '').split('@')[0] for s in job['steps'][:2]] == ['actions/checkout', 'actions/setup-python'], name


def test_ci_runs_on_every_push_and_pull_request():
    wf = workflow('test.yaml')
    assert 'push' in wf['on'] and 'pull_request' in wf['on']
    assert not (wf['on']['push'] or {}).get('branches') and not (wf['on']['pull_request'] or {}).get('branches')


def test_ci_installs_cpu_torch_then_runs_the_readme_commands():
    "The CPU wheel first, then the README's set-up command, then its test command, each its own step, to the letter."
    job, = workflow('test.yaml')['jobs'].values()
    commands = runs(job)
    torch_step = index_of(job, installs_cpu_torch, f"installing torch from {CPU_INDEX}")
    setup_step = commands.index(readme_command('setup-command'))
    test_step = commands.index(readme_command('test-command'))
    assert torch_step < setup_step < test_step
    assert index_of(job, uses('actions/setup-python'), 'setting up Python') < torch_step


def test_every_set_up_pins_the_torch_of_ci_run():
    """The workflows, the README and CONTRIBUTING.md install the torch that .ci/run tests, the README and
    CONTRIBUTING.md from PyTorch's own CPU index."""
    pinned = set(re.findall(r'torch==([\d.]+)', (ROOT/'.ci'/'run').read_text()))
    assert len(pinned) == 1, pinned
    for path in (WORKFLOWS/'test.yaml', WORKFLOWS/'deploy.yaml', ROOT/'README.md', ROOT/'CONTRIBUTING.md'):
        assert set(re.findall(r'torch==([\d.]+)', path.read_text())) == pinned, path.name
    for path in (ROOT/'README.md', ROOT/'CONTRIBUTING.md'):
        version, = pinned
        assert f'pip install torch=={version} --index-url {CPU_INDEX}' in path.read_text(), path.name


def test_ci_never_skips_the_browser_test():
    "As in .ci/run, the docs' browser test must fail rather than skip, and a browser is installed before the tests."
    job, = workflow('test.yaml')['jobs'].values()
    assert str(job['env']['ADDITIVE_POS_ATTN_REQUIRE_BROWSER']) == '1'
    browser = index_of(job, lambda s: 'playwright install' in s.get('run', ''), 'installing a browser')
    assert 'ADDITIVE_POS_ATTN_CHROMIUM' in job['steps'][browser]['run']
    assert browser < runs(job).index(readme_command('test-command'))


def test_deploy_publishes_the_docs_of_the_main_branch():
    wf = workflow('deploy.yaml')
    cfg = settings()
    assert list(wf['on']) in (['push'], ['push', 'workflow_dispatch'])
    assert wf['on']['push']['branches'] == [cfg['branch']]
    build, deploy = wf['jobs']['build'], wf['jobs']['deploy']
    # the docs: CPU torch, the package with its dev extra, then a build that writes settings.ini's doc_path
    commands = runs(build)
    torch_step = index_of(build, installs_cpu_torch, f"installing torch from {CPU_INDEX}")
    setup_step = index_of(build, lambda s: s.get('run', '').strip().startswith('pip install -e ".[dev'), 'installing the package')
    build_step = next(i for i, c in enumerate(commands) if c in ('nbdev_docs', 'python tools/build_docs.py'))
    if commands[build_step] == 'nbdev_docs':
        assert index_of(build, uses('quarto-dev/quarto-actions/setup'), 'setting up Quarto') < build_step
    upload = index_of(build, uses('actions/upload-pages-artifact'), 'uploading the site')
    assert torch_step < setup_step < build_step < upload
    assert build['steps'][upload]['with']['path'].rstrip('/') == cfg['doc_path'] == '_docs'
    # the deployment: after the build, with the permissions GitHub Pages asks for, to its environment
    assert deploy['needs'] in ('build', ['build'])
    permissions = {**wf.get('permissions', {}), **deploy.get('permissions', {})}
    assert permissions['pages'] == 'write' and permissions['id-token'] == 'write'
    assert deploy['environment']['name'] == 'github-pages'
    assert [s['uses'].split('@')[0] for s in deploy['steps']] == ['actions/deploy-pages']
