#!/usr/bin/env bash
# GPU check of the LoRA kernels, in one go, on a machine with an NVIDIA GPU:
#   1. make `alora` importable (reuse a built extension, else maturin develop / pip install -e);
#   2. `alora check-kernels` for the device's architecture;
#   3. the GPU tests (pytest -m cuda: kernels vs float64 reference, runtime end to end);
#   4. the Rust criterion kernel benches (benches/benches/kernels.rs);
#   5. the Python end-to-end bench (python -m alora.kernels.bench);
# and writes JSON results (device from nvidia-smi, date, commit) to $OUT when set, else to
# benches/results/gpu-<date>/. Exit status: non-zero when a test failed or a step broke.
#
# Environment:
#   PYTHON            interpreter to use (default: python3)
#   ALORA_GPU_VENV=1  create .venv-gpu and `pip install -e .[dev]` (needs a package index)
#   KERNEL_BENCH_BIN  a prebuilt kernels bench binary (`cargo bench --bench kernels --no-run`),
#                     for machines without cargo
#   ALORA_COMMIT      commit to record when the tree has no .git
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
DEST="${OUT:-$ROOT/benches/results/gpu-$STAMP}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
declare -A STEP

note() { printf '\n=== %s\n' "$*"; }

note "device"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: this script needs an NVIDIA GPU" >&2
  exit 2
fi
DEVICE="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
COMMIT="${ALORA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
echo "$DEVICE / commit $COMMIT / $STAMP"

note "environment"
if [ "${ALORA_GPU_VENV:-0}" = "1" ]; then
  "$PY" -m venv "$ROOT/.venv-gpu" && PY="$ROOT/.venv-gpu/bin/python" &&
    "$PY" -m pip install -q -e ".[dev]" || { echo "venv setup failed" >&2; exit 2; }
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import alora._core" 2>/dev/null; then
  if command -v maturin >/dev/null 2>&1 || "$PY" -m maturin --version >/dev/null 2>&1; then
    (cd "$ROOT" && "$PY" -m maturin develop -q --release) || { echo "maturin develop failed" >&2; exit 2; }
  else
    echo "alora._core is not importable and maturin is missing: build python/alora/_core*.so" \
      "elsewhere (maturin develop) and bring it along, or set ALORA_GPU_VENV=1" >&2
    exit 2
  fi
fi
"$PY" -c "import torch, cuda.core; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" ||
  { echo "torch with CUDA and cuda-python (cuda.core) are needed" >&2; exit 2; }
# NVRTC for the Rust bench: the nvidia-cuda-nvrtc wheel's library directory, if there is one.
NVRTC_DIR="$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so.*"))):
        print(os.path.dirname(lib)); raise SystemExit
EOF
)"
[ -n "$NVRTC_DIR" ] && export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ALORA_KERNEL_CACHE="${ALORA_KERNEL_CACHE:-$ROOT/target/alora-kernel-cache}"

note "check-kernels"
ARCH="$("$PY" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")"
"$PY" -c "import sys; from alora.kernels.check import main; sys.exit(main(['--arch', 'sm_80,sm_89,sm_90,$ARCH']))" \
  >"$DEST/check_kernels.txt" 2>&1
STEP[check_kernels]=$?
cat "$DEST/check_kernels.txt"

note "GPU tests"
"$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests 2>&1 | tee "$DEST/gpu_tests.log"
STEP[gpu_tests]=${PIPESTATUS[0]}

note "Rust kernel benches"
if command -v cargo >/dev/null 2>&1; then
  ALORA_KERNEL_BENCH_JSON="$DEST/kernel_bench.json" cargo bench -p alora-benches --bench kernels \
    2>&1 | tee "$DEST/kernel_bench.log"
  STEP[kernel_bench]=${PIPESTATUS[0]}
elif [ -n "${KERNEL_BENCH_BIN:-}" ]; then
  ALORA_KERNEL_BENCH_JSON="$DEST/kernel_bench.json" "$KERNEL_BENCH_BIN" --bench \
    2>&1 | tee "$DEST/kernel_bench.log"
  STEP[kernel_bench]=${PIPESTATUS[0]}
else
  echo "skipped: no cargo and no KERNEL_BENCH_BIN" | tee "$DEST/kernel_bench.log"
  STEP[kernel_bench]=skipped
fi

note "end-to-end bench"
"$PY" -m alora.kernels.bench --out "$DEST/e2e_bench.json" 2>&1 | tail -5
STEP[e2e_bench]=${PIPESTATUS[0]}

for k in "${!STEP[@]}"; do
  case "${STEP[$k]}" in 0 | skipped) ;; *) status=1 ;; esac
done
STEPS_JSON="$(for k in "${!STEP[@]}"; do printf '"%s": "%s",' "$k" "${STEP[$k]}"; done)"
DEVICE="$DEVICE" COMMIT="$COMMIT" STAMP="$STAMP" DEST="$DEST" STEPS="{${STEPS_JSON%,}}" "$PY" - <<'EOF'
import json, os, re
dest = os.environ["DEST"]
def load(name):
    try:
        with open(os.path.join(dest, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
tests = None
try:
    tail = open(os.path.join(dest, "gpu_tests.log")).read().strip().splitlines()[-1]
    tests = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
except (OSError, IndexError):
    pass
out = {
    "device": os.environ["DEVICE"],
    "date": os.environ["STAMP"],
    "commit": os.environ["COMMIT"],
    "steps": json.loads(os.environ["STEPS"]),
    "gpu_tests": tests,
    "kernel_bench": load("kernel_bench.json"),
    "e2e_bench": load("e2e_bench.json"),
}
with open(os.path.join(dest, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
print(json.dumps({k: out[k] for k in ("device", "date", "commit", "steps", "gpu_tests")}, indent=2))
EOF
echo "results in $DEST"
exit $status
