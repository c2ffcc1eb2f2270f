#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run of a few minutes:
#   1. tests/test_cuda.py: mixed precision as 'auto' picks it, fp16 loss scaling, 8-bit AdamW, QLoRA over a bitsandbytes-quantized
#      denoiser, gradient checkpointing, and results drawn on the GPU, for each family's tiny model;
#   2. the benchmark on SD 1.5's architecture (random weights, 512 px) against the reference loop of the diffusers example;
#   3. the benchmark on SDXL's architecture (2.57 B-parameter UNet, 1024 px), ours alone.
# Usage, from the repository's root on the GPU machine:  bash tools/cuda_check.sh [LOG_DIR]
# STAGES picks some (default "tests sd15 sdxl"). Each stage has a time limit (TEST_S, SD15_S, SDXL_S seconds) and writes its log to LOG_DIR (default $OUT, else /tmp/cuda-check)
# as it goes, so a stage cut short still leaves what it measured. On a bare machine whose Python lacks diffusers, peft or
# bitsandbytes, wheels put in .whl/ (see the device notes in the README) are installed into a temporary folder first.
set -u
log=${1:-${OUT:-/tmp/cuda-check}}; mkdir -p "$log"
py=${PYTHON:-python3}
if [ -d .whl ] && ! $py -c 'import diffusers, peft, bitsandbytes, fastcore, pydantic' 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cft-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/cft-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
models=${MODELS_DIR:-/tmp/cft-models}; mkdir -p "$models"
status=0
want() { [[ " ${STAGES:-tests sd15 sdxl} " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import sys, torch, diffusers, peft, transformers, accelerate, bitsandbytes as b
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "peft", peft.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__, "bitsandbytes", b.__version__)'; } 2>&1 | tee "$log/versions.txt"

want tests && { echo "== 1. tests/test_cuda.py"
timeout "${TEST_S:-240}" $py -m pytest -q -p no:cacheprovider -rs --durations=0 tests/test_cuda.py 2>&1 | tee "$log/test_cuda.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1; }

want sd15 && { echo "== 2. SD 1.5's architecture, 512 px, batch 1: ours against the reference loop"
timeout "${SD15_S:-200}" bash -c "$py -c \"from cerebrium_ft.testing import build_tiny_pipeline, SD15_ARCHITECTURE as A; build_tiny_pipeline('$models/sd15', **A)\" &&
  $py tools/benchmark.py --models '$models/sd15' --resolution 512 --batch 1 --steps 30 --raw '$log/bench.jsonl'" 2>&1 | tee "$log/bench-sd15.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1; }

want sdxl && { echo "== 3. SDXL's architecture, 1024 px, batch 1: ours alone"
timeout "${SDXL_S:-360}" bash -c "$py -c \"from cerebrium_ft.testing import build_tiny_pipeline, SDXL_ARCHITECTURE as A; build_tiny_pipeline('$models/sdxl', family='sdxl', **A)\" &&
  $py tools/benchmark.py --models '$models/sdxl' --resolution 1024 --batch 1 --steps 20 --no-reference --no-fp32-check --raw '$log/bench.jsonl'" 2>&1 | tee "$log/bench-sdxl.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1; }
exit $status
