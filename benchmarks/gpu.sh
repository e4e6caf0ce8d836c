#!/usr/bin/env bash
# Embedding throughput on one GPU: ViT-B-32 and ViT-L-14-336 end to end (read + decode + model,
# inmap's pipeline beside the naive loop) next to the model alone on ready batches, all on the same
# GPU with random weights (throughput does not depend on the weights).
#
#   bash benchmarks/gpu.sh                     # 1000 sample images, batch 256
#   LIMIT=500 BATCH=128 bash benchmarks/gpu.sh --repeat 1
#
# Needs: `pip install -e .` and a CUDA build of torch (uses $PYTHON, else .venv/bin/python, else
# python). Extra arguments go to benchmarks/embed.py.
# If end to end is far below model-only, decoding is the bottleneck: compare with the CPU count
# printed in the header line (decode workers default to one per CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

"$PYTHON" benchmarks/embed.py \
  --device cuda \
  --models ViT-B-32 ViT-L-14-336 \
  --sources local \
  --stages end-to-end \
  --model-only \
  --limit "${LIMIT:-1000}" \
  --batch-size "${BATCH:-256}" \
  --repeat 2 \
  "$@"
