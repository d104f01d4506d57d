#!/usr/bin/env bash
# fp16 on CUDA through both strategies: DDP (torch's GradScaler per network) and DeepSpeed (its loss scaler per
# engine, ZeRO-1 and ZeRO-2), against fp32 and bf16; one JSON line each (images/s, loss scales, skipped steps).
#   bash bench/precision_gpu.sh [STEPS] [more Hydra overrides]
# Needs a CUDA GPU and deepspeed; on more GPUs run the same under torchrun to exercise NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-40}; shift || true
PY=${PYTHON:-python}
base=(experiment=stylegan2_cifar32 "$@")
for run in "precision=fp32" "precision=bf16" "precision=fp16" \
           "precision=fp16 strategy=deepspeed strategy.zero_stage=1" \
           "precision=fp16 strategy=deepspeed strategy.zero_stage=2" \
           "precision=fp16 precision.scope=model model.generator.num_fp16_res=4 model.discriminator.num_fp16_res=4 model.generator.conv_clamp=256 model.discriminator.conv_clamp=256"; do
  # shellcheck disable=SC2086
  $PY bench/train_throughput.py --steps "$STEPS" --warmup 5 "${base[@]}" $run
done
