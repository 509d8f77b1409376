#!/usr/bin/env bash
# Train every shipped Fashion-MNIST model (resnet20: 20 epochs, vgg: 15 epochs) with the
# final settings and write the weights + metadata into tensorly_dataaware/models/.
# Run from the repository root on a CUDA machine; extra arguments are passed through,
# e.g. `bash benchmarks/train_all.sh --data-root /path/to/fashion-mnist`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/train_fashion.py --all --device "${DEVICE:-cuda}" --seed 0 "$@"
