#!/usr/bin/env bash
# The GPU check, on a machine with one GPU and no network: at most ~8 minutes, one table at the end.
#
#   make gpu-wheels                       # beforehand, online: wheels of what a GPU image may lack -> .whl/
#   bash experiments/gpu_check.sh [WHEELS] [gpu_check.py options, e.g. --peak-tflops 989]
#
# The machine's Python must hold torch, lightning, torchmetrics, sentencepiece and transformers; anything
# else t2i imports is installed from WHEELS (default .whl), never from the network. The tests marked
# `gpu` run first, then experiments/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${1:-.whl}
shift || true
missing=$($PY - <<'PYEOF'
import importlib.util
needed = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
          "webdataset": "webdataset", "braceexpand": "braceexpand", "torch_fidelity": "torch-fidelity",
          "lpips": "lpips", "tokenizers": "tokenizers"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "installing from $WHEELS: $missing"
    $PY -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" --target /tmp/t2i-site $missing
    export PYTHONPATH=/tmp/t2i-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || echo "GPU tests: FAILED or timed out (above)"
timeout 420 $PY experiments/gpu_check.py "$@"
