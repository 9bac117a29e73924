#!/usr/bin/env bash
# GPU overhead and encode-throughput check (issue 12): random-weight SD-1.5 and SDXL architectures, each image once
# per epoch, without / inline / deferred, bf16-mixed training, then `montrage encode` of the deferred store on the GPU.
# Usage (on a CUDA machine, after `pip install -e .` with a CUDA torch): bash montrage/bench/gpu.sh OUT_DIR
set -euo pipefail
out=${1:-gpu_bench}
mkdir -p "$out"
montrage bench overhead --accelerator gpu --model sd15 --resolution 512 --repeats 1 --images-per-concept 32 \
    --epochs 2 --rounds 3 --out "$out/overhead_gpu_sd15_512.json"
montrage bench overhead --accelerator gpu --model sdxl --resolution 1024 --repeats 1 --images-per-concept 16 \
    --epochs 2 --rounds 3 --out "$out/overhead_gpu_sdxl_1024.json"
