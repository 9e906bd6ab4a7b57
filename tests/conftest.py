"""Shared pytest fixtures and hooks: the devices to test on, and the `cuda` marker.

Where there is no GPU the CUDA tests (marked `cuda` by hand, or the `cuda` cell of the `device` fixture) are
deselected, not skipped one by one: the run reports them in one line. `pytest -m cuda` on a GPU machine selects them."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param('cpu', id='cpu'), pytest.param('cuda', id='cuda', marks=pytest.mark.cuda)]
_NO_CUDA_REASON = 'no CUDA device'


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    "Every device-parametrised test runs on the CPU, and on CUDA when it is present (the `cuda` cells carry the `cuda` mark)."
    return request.param


def pytest_collection_modifyitems(config, items):
    "Without a GPU, every test marked `cuda` (by hand or through `device`) is deselected, as nbdev skips `#| cuda` cells."
    if HAS_CUDA: return
    cuda = [item for item in items if item.get_closest_marker('cuda') is not None]
    if not cuda: return
    config.hook.pytest_deselected(items=cuda)
    chosen = set(map(id, cuda))
    items[:] = [item for item in items if id(item) not in chosen]
    config.stash[_CUDA_DESELECTED] = len(cuda)


_CUDA_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = config.stash.get(_CUDA_DESELECTED, 0)
    if count: terminalreporter.write_line(f"{count} CUDA tests deselected: {_NO_CUDA_REASON}")


@pytest.fixture(scope='module')
def one_thread():
    "One CPU thread for a module of tiny tensors (a second costs more in synchronisation than it saves); restored after."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
