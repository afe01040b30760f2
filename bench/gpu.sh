#!/usr/bin/env bash
# Real-shape throughput on a CUDA GPU (GPT-2 124M teacher, 6-layer student): tokens/s, MFU, peak memory.
# Run from anywhere after the README install:  bash bench/gpu.sh [--compile] [--batch-size N] [--peak-tflops X]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # random weights: nothing is downloaded
exec python3 bench/gpu.py "$@"
