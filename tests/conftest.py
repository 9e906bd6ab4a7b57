"Shared pytest fixtures: the devices to test on, and the `cuda` marker that skips where there is no GPU."
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param('cpu', id='cpu'),
           pytest.param('cuda', id='cuda', marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason='needs CUDA')])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    "Every device-parametrised test runs on the CPU, and on CUDA when it is present (the `cuda` cells carry the `cuda` mark)."
    return request.param


def pytest_collection_modifyitems(config, items):
    "Tests marked `cuda` by hand are skipped where there is no GPU, as nbdev skips `#| cuda` cells."
    if HAS_CUDA: return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)
