import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import tiny`
torch.set_num_threads(min(2, os.cpu_count() or 1))

import tiny  # noqa: E402

import lora_lite as ll  # noqa: E402


@pytest.fixture(params=sorted(ll.REGISTRY))
def variant_name(request):
    """Parametrizes a test over every registered variant."""
    return request.param


@pytest.fixture
def pca():
    """The test-only calibration variant (tiny.PCA), registered for one test."""
    tiny.PCA.calls.clear()
    with tiny.registered(tiny.PCA):
        yield tiny.PCA
