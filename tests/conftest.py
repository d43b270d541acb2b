import os

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
