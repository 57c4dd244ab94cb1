#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch, the test/bench tools, and fastcnn built in
# place (its C++ CPU kernels always; its CUDA kernels when torch is a CUDA build and a CUDA toolkit is found).
# FASTCNN_TORCH overrides the torch requirement (default: the CUDA 13.0 build of torch 2.14.1) and FASTCNN_TORCHVISION
# the matching torchvision (a test-only dependency: the zoo's tests load torchvision's models and weights layout).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "${FASTCNN_TORCH:-torch==2.14.1}" "${FASTCNN_TORCHVISION:-torchvision==0.29.1}" ninja numpy \
    pytest pytest-benchmark hypothesis expecttest matplotlib scikit-learn scikit-image pillow tqdm timm
# --no-build-isolation: build against the torch just installed, not a second copy in a throw-away environment.
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m fastcnn.info
