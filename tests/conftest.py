import os

import pytest
import torch

# Deterministic, single-threaded-friendly CPU settings for every test.
torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("KEYETRON_DEVICE", "cpu")


@pytest.fixture
def tiny_cfg():
    from keyetron.model import load_model_config

    return load_model_config("tiny")
