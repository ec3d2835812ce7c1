#!/usr/bin/env bash
# The GPU benchmarks in one command, on a machine with an NVIDIA GPU:
#   1. checks the GPU (nvidia-smi, and that torch sees CUDA and Triton imports);
#   2. times the Triton kernels against their torch references (bench/kernel_bench.py);
#   3. serves each demo model in bfloat16 on the GPU and loads it with concurrent HH-RLHF dialogues, the
#      dense demo also int8 and nf4 (bench/gpu_serving.py);
#   4. scores the held-out HH pairs with the demo unquantised, int8 and nf4 in bfloat16 on the GPU:
#      agreement with the unquantised model, accuracy, memory (bench/quantize.py);
#   5. times GRPO-shaped groups (G responses to one HH prompt) with and without prefix sharing, and the
#      shortest prefix worth sharing, offline in bfloat16 on the GPU (bench/prefix.py --offline).
# Steps 2 to 5 write their sections of docs/benchmarks-gpu.md. Without a CUDA GPU it stops at step 1.
#
#   bash bench/gpu.sh          (or: make bench-gpu)
#
# PYTHON picks the interpreter (default: the repository's .venv, from `make install` with a CUDA torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

fail() {
    echo "bench/gpu.sh: $*" >&2
    exit 1
}

command -v nvidia-smi >/dev/null 2>&1 ||
    fail "needs a CUDA GPU, and this machine has no NVIDIA driver (nvidia-smi is not on PATH). Run it on a machine with an NVIDIA GPU; on this one, python bench/kernel_bench.py --smoke checks the kernel benchmark in Triton's CPU interpreter."
nvidia-smi -L >/dev/null 2>&1 ||
    fail "needs a CUDA GPU, but nvidia-smi lists none ($(nvidia-smi -L 2>&1 | head -n 1)). Check the driver and that the GPU is visible here."
[ -x "$PYTHON" ] || fail "no Python at $PYTHON; run 'make install' (with a CUDA build of torch) or set PYTHON."
[ "${TRITON_INTERPRET:-0}" != "1" ] ||
    fail "TRITON_INTERPRET=1 is set, so the kernels would run in Triton's CPU interpreter; unset it."
"$PYTHON" - <<'EOF' || fail "the GPU is there but this Python cannot use it (see above)."
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device. Install a CUDA "
        "build of torch (make install TORCH='torch==... --index-url https://download.pytorch.org/whl/cuXXX')."
    )
try:
    import triton
except ImportError:
    sys.exit("Triton is not installed; pip install 'rmserve[gpu]' (or triton).")
props = torch.cuda.get_device_properties(0)
print(
    f"GPU {props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}"
)
EOF

cd "$ROOT"
nvidia-smi
"$PYTHON" bench/kernel_bench.py
# demo-moe and demo-merged are built by their explicit training run first (cached after the first time)
"$PYTHON" -m rmserve demo build-moe --data "${HH_DATA:-$ROOT/../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}"
"$PYTHON" bench/gpu_serving.py
"$PYTHON" bench/quantize.py --device cuda --dtype bfloat16
"$PYTHON" bench/prefix.py --offline --device cuda --dtype bfloat16 --out docs/benchmarks-gpu.md
echo "bench/gpu.sh: wrote docs/benchmarks-gpu.md"
