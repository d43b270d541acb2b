import os
import shutil

import pytest
import torch

# Deterministic, single-threaded-friendly CPU settings for every test.
torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("KEYETRON_DEVICE", "cpu")

# tqdm (progress bars of transformers' loaders) starts a monitor thread that outlives the test;
# with another thread alive the multi-process launcher must spawn ranks instead of forking them.
try:
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:  # pragma: no cover - tqdm comes with transformers
    pass


@pytest.fixture
def tiny_cfg():
    from keyetron.model import load_model_config

    return load_model_config("tiny")


# torch.compile and torchao leave state behind that hangs forked ranks, so after them the
# multi-process tests must spawn (tests/distributed.py), which costs ~3 s a launch: run the
# tests that compile or load torchao last.
_LAST = ("tests/backend/test_compile.py", "tests/backend/test_fp8.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: any(str(item.path).endswith(name) for name in _LAST))


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(request, tmp_path_factory):
    """Delete the folders a test module made (its module fixtures' checkpoints and demo data) once
    the module is done, unless one of its tests failed: pytest.ini's retention policy only covers
    per-test `tmp_path`, and module folders would otherwise pile up to ~10 GB over a run."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
