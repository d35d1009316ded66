#!/usr/bin/env bash
# One command on a fresh machine: install, make a tiny random Qwen3-MoE model with a tokenizer and
# chat template, and chat with it through the real coordinator, GPU-worker and CPU-pool processes.
# With real weights: krasis-coord generate /path/to/hf-model --messages '[...]' --devices cuda:0
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
model="${KRASIS_DEMO_MODEL:-/tmp/krasis-demo-model}"
python deploy/make_demo_model.py "$model"
krasis-coord generate "$model" --devices cpu,cpu --cpu-workers 2 --max-new-tokens 24 \
  --messages '[{"role": "user", "content": "Where do the routed experts run?"}]' --json
