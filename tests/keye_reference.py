"""Import keye-vl-utils 1.5.2 (the public Keye-VL-1.5 processor) as a reference for parity tests.

It imports torchvision at module level without using it, and the CPU registry only has a
CUDA-linked torchvision, so a stand-in module is used for the import and removed again.
"""
import sys
import types

import pytest


def keye_vision_process(*needs: str):
    """The ``keye_vl_utils.vision_process`` module, or a pytest skip naming what is missing."""
    for name in needs:
        pytest.importorskip(name, reason=f"keye-vl-utils 1.5.2 needs {name}; `make setup` installs it")
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.io", "torchvision.transforms")}
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tv.io, tv.transforms = types.ModuleType("torchvision.io"), types.ModuleType("torchvision.transforms")
        tv.transforms.InterpolationMode = object
        sys.modules.update({"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms})
    try:
        return pytest.importorskip("keye_vl_utils.vision_process", reason="pip install keye-vl-utils==1.5.2")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
