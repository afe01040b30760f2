#!/usr/bin/env bash
# Real shapes on a CUDA GPU (GPT-2 124M teacher, 6-layer student). First the raw training step of both losses
# (python3 -m bench.gpu: tokens/s, MFU, peak memory), then config.yaml itself through distill.py with bf16 autocast
# (the teacher is bfloat16 by teacher.dtype: auto), as a user's GPU run, with the estimate of the full run's time
# (python3 -m bench.rehearsal; needs requirements-dev.txt for GPT-2's tokenizer files).
# Run from anywhere after the README install:  bash bench/gpu.sh [--compile] [--batch-size N] [--peak-tflops X]
set -euo pipefail
cd "$(dirname "$0")/.."  # the modules run from the repository root
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # random weights and local stand-ins: nothing is downloaded
python3 -m bench.gpu "$@"
python3 -m bench.rehearsal --rows 2000 --steps 20 --set hardware.mixed_precision=bf16
