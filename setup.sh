#!/usr/bin/env bash
# Set up starfish_fast on a fresh machine: Fashion-MNIST from Debian, a virtual
# environment in .venv with torch 2.14.1 / torchvision 0.29.1 and the package.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
    $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch and torchvision first, pinned: PyPI's torchvision does not import beside other torch builds.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
# The GPU machines run triton 3.6: its ahead-of-time compiler checks our kernels in the tests
# (tests/test_kernels_compile.py), installed beside the main triton, not over it.
[ -d .venv/triton-3.6.0/triton ] || .venv/bin/python -m pip install -q --no-deps --target .venv/triton-3.6.0 triton==3.6.0
