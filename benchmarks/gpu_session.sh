#!/usr/bin/env bash
# The GPU checks of the training issue, as one prepared run on a bare CUDA machine whose python3
# has torch but not this project's stack (no network there). Expects, in the repo root:
#   .whl/       the monai wheel (pip download --no-deps monai==<version in requirements.lock>)
#   .devdata/prep.tar.xz   outputs/preprocessed + outputs/split.csv of the default cohort
# and writes its logs under $OUT (default ./gpu_out). Steps:
#   1. bf16 / fp16 autocast vs float32 on the joint fine-tuning step (loss and gradient error)
#   2. training throughput and peak GPU memory, default and paper profiles (bench_train.py)
#   3. budget sweep (budget_sweep.py): segmentation pre-training variants at the default budget
#      and longer, and the three stages end to end at a longer budget, in parallel on the GPU
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
tar -xJf .devdata/prep.tar.xz || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name())"

timeout 150 python3 benchmarks/bench_train.py --profile default paper --device cuda --check-amp --steps 10 --warmup 3 \
    --train-scans 66 2>&1 | grep -v Warning | tee "$OUT/bench_train.txt"

SEG="${SEG_VARIANTS:-base paper_seg_loss focal10 lr2x batch4 wide base@120 paper_seg_loss@120}"
ALL="${ALL_VARIANTS:-base@60 reference_context@60}"
timeout "${SWEEP_SECONDS:-420}" python3 benchmarks/budget_sweep.py --device cuda --stages seg --jobs 10 --threads 1 \
    --variants $SEG --out /tmp/sweep_seg --json "$OUT/sweep_seg.json" > "$OUT/sweep_seg.txt" 2>&1 &
timeout "${SWEEP_SECONDS:-420}" python3 benchmarks/budget_sweep.py --device cuda --stages all --jobs 2 --threads 1 \
    --variants $ALL --out /tmp/sweep_all --json "$OUT/sweep_all.json" > "$OUT/sweep_all.txt" 2>&1 &
wait
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
grep -v Warning "$OUT/sweep_seg.txt" | tail -14
grep -v Warning "$OUT/sweep_all.txt" | tail -5
