#!/usr/bin/env bash
# Installs Krasis and its test dependencies into the current Python (3.11+).
# torch is installed first and pinned: an unpinned requirement would pull a multi-GB CUDA build
# on machines that have none (set KRASIS_TORCH to choose another build, e.g. "torch" on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${KRASIS_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
