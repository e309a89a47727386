#!/usr/bin/env bash
# The GPU checks of twotower in one script, within ten minutes, on a CUDA machine that has Python 3.12
# and a CUDA torch but none of megatron-core / Transformer Engine / mamba-ssm / causal-conv1d, and no
# network. Two halves:
#
#   bash tests/gpu/run_on_device.sh download   # HERE (pip + network): wheels into .whl/ (git-ignored)
#   bash tests/gpu/run_on_device.sh            # THERE: install .whl/*.whl + this project, run the checks
#
# With this workplace's device tool: `run(command="bash tests/gpu/run_on_device.sh", carry=[".whl"],
# timeout_s=600)`; logs and the MFU JSON come back from $OUT (else ./gpu_out).
#
# `download` fetches megatron-core 0.16.1 and the pure-Python dependencies the device image lacks, for
# cp312 manylinux. Transformer Engine, mamba-ssm and causal-conv1d have no usable PyPI wheels (sdists
# that compile CUDA for a long time): put prebuilt wheels matching the device's torch/CUDA (their GitHub
# releases, or a cluster's build cache) into .whl/ by hand. The device tool carries at most 64 MiB, so
# TE's CUDA wheels (hundreds of MiB) only travel where that limit is higher. Whatever is missing is
# reported, and the tests that need it skip, naming it; the backends then fall back (`auto`).
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/twotower_site}
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}

if [[ "${1:-}" == "download" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  for pkg in megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
             webdataset braceexpand; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d "$WHEELS" "$pkg" || "$PY" -m pip download -q --no-deps -d "$WHEELS" "$pkg"
  done
  ls -la "$WHEELS"; du -sh "$WHEELS"
  exit 0
fi

mkdir -p "$OUT"
t0=$SECONDS
log() { echo "[run_on_device $((SECONDS - t0))s] $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"

# 1. install: the carried wheels, then this project (no network, no dependency resolution)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { log "FAILED: installing $WHEELS/*.whl"; exit 3; }
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
  || { log "FAILED: installing the project"; exit 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
"$PY" - <<'PY' | tee -a "$OUT/summary.txt"
from twotower.model import backends
print("installed:", backends.installed())
for key in ("transformer_impl", "attention_backend", "ssm_backend"):
    print(f"  parallel.{key}=auto ->", backends.resolve(key, "auto"))
PY

# 2. the GPU tests (tests/gpu and the gpu-marked kernel tests of tests/model); CPU tests skip on CUDA
timeout 380 "$PY" -m pytest -p no:cacheprovider -q -rs -m gpu tests/gpu tests/model/test_ssd.py \
  tests/model/test_causal_conv.py --basetemp=/tmp/twotower_gpu_bt --junitxml="$OUT/gpu_tests.xml" \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
log "gpu tests: exit $tests_rc"

# 3. the MFU benchmark (AR vs TwoTower on a full-width slice of the 30B-A3B mix)
left=$((570 - (SECONDS - t0)))
if (( left > 60 )); then
  timeout "$left" "$PY" tests/benchmarks/bench_gpu_mfu.py --json "$OUT/mfu.json" 2>&1 | tee "$OUT/bench_gpu_mfu.log"
  log "bench_gpu_mfu: exit ${PIPESTATUS[0]}"
else
  log "bench_gpu_mfu: skipped, only ${left}s left of the ten minutes"
fi
log "done"
exit "$tests_rc"
