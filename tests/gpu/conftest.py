import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: make test-gpu)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
