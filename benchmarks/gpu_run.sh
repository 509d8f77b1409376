#!/usr/bin/env bash
# The one-shot GPU check, run through the device tool on an H100/H200 machine:
#   CUDA correctness tests (PyTorch and JAX), solver speed on GPU with PyTorch and JAX (and on
#   that machine's 16-core CPU), and the
#   end-to-end compression of a ResNet-50-shaped model. Results land in $OUT.
# The GPU image has PyTorch (and JAX) but not TensorLy: fetch the wheels here first,
#   pip download tensorly opt_einsum --no-deps --only-binary=:all: -d .whl
# and run this script with the device tool's carry=[".whl"] (.whl/ is git-ignored).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, tensorly, numpy; print('torch', torch.__version__, 'tensorly', tensorly.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 | tee "$OUT/test_cuda.txt"
timeout 200 python3 benchmarks/speed.py --backend pytorch --device cuda \
    --shapes 64x64x3x3 128x128x3x3 256x256x3x3 512x512x3x3 --reference-budget 10 \
    --out "$OUT/speed_cuda.json" 2>&1 | grep -v -i warn | tee "$OUT/speed_cuda.txt"
timeout 100 python3 benchmarks/resnet50_e2e.py --device cuda --images 32 --out "$OUT/resnet50_cuda.json" 2>&1 \
    | tee "$OUT/resnet50_cuda.txt" | grep -E "^==|^total|collect"
# JAX on the GPU (issue 10; never run so far): the image's jax with its CUDA plugin puts the
# arrays on the GPU by default (speed.py records jax_default_device); TensorLy's JAX solvers
# are the baseline.
timeout 150 python3 benchmarks/speed.py --backend jax --shapes 64x64x3x3 128x128x3x3 256x256x3x3 \
    --dtypes float64 --no-reference --repeats 3 --out "$OUT/speed_jax_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/speed_jax_gpu.txt"
timeout 60 python3 benchmarks/speed.py --backend numpy --shapes 64x64x3x3 128x128x3x3 256x256x3x3 \
    --dtypes float64 --reference-budget 15 --out "$OUT/speed_host_cpu.json" 2>&1 | grep -v -i warn | tee "$OUT/speed_host_cpu.txt"
exit 0
