#!/bin/bash
# One prepared run on a CUDA host: the CUDA tests, then the GPU throughput preset (both decode paths).
# Results go to $OUT (default ./gpu-results); the last lines are a short table.
# Optional: wheels in .whl/ (kafka-python, crc32c) and a tansu binary in .carry/bin/ for hosts without a registry.
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -x .carry/bin/tansu ] && export STREAMKD_BROKER_BIN="$PWD/.carry/bin/tansu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_gpu_decode.py tests/test_preprocess.py tests/test_loss.py 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
# What caps the compute ceiling: the student step alone, per precision / channels_last / compile.
timeout 150 python3 bench/student_step.py --steps 20 2>&1 | tee "$OUT/student-step.log"
# Same at batch 64: about the same step time as at 256 (img/s ~4x lower) means the step is bound by
# kernel launches on the host, not by the GPU (then CUDA graphs / compile are the fix, not kernels).
timeout 40 python3 bench/student_step.py --steps 20 --batch 64 --no-compile 2>&1 | tee "$OUT/student-step-b64.log"
# Two end-to-end variants, sized to keep the whole script within about ten minutes on a large GPU (the
# hand-written reference loop is slow, so the second times it on fewer records). torch.compile's
# effect on the ceiling is in the student-step matrix above; loop_*_ms in the JSON say where e2e loses.
timeout 200 python3 bench/throughput.py --preset gpu 2>&1 | tee "$OUT/throughput-gpu.log"
timeout 80 python3 bench/throughput.py --preset gpu --records 30000 --naive-records 4000 --set input.gpu_decode=false 2>&1 | tee "$OUT/throughput-gpu-cpudecode.log"
echo "== summary =="
for f in "$OUT"/student-step*.log "$OUT"/throughput-gpu*.log; do echo "$(basename "$f"): $(tail -n 1 "$f")"; done
