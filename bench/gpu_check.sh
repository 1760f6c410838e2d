#!/usr/bin/env bash
# Issue 18's whole GPU check in one run of about 8 minutes on one H200: the `gpu` tests, then every
# speed figure against its goal (bench/gpu_goals.py), then the goals in one table.
#
#   here, once:   bash bench/gpu_deps.sh                 (.gpu_deps/: Hydra, OmegaConf, ANTLR)
#   device run:   carry [".gpu_deps"], timeout_s 600, command: bash bench/gpu_check.sh
#
# Everything lands in $OUT (the device tool brings it back): pytest_gpu.txt, gpu_goals.md (the
# tables for docs/gpu.md), gpu_goals.txt (the full output), profile.txt (top kernels of the step).
# Each part has its own time limit, so a hang in one still returns the others' figures.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
# a fresh Inductor cache: compile and recompile times are those of a first run on the machine
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" MSGRUN_CACHE="$(mktemp -d)"
PY=${PY:-python3}
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }

stamp "versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
date -u
# msgrun from this tree, uninstalled (no index there, and an editable build needs `wheel`): the
# Hydra configs ship as the package msgrun.conf (pyproject's package-dir maps it to conf/), so a
# link msgrun/conf -> ../conf stands in for the install, removed again at exit
export PYTHONPATH="$PWD:$PYTHONPATH"
if ! $PY -c "import msgrun.conf" 2>/dev/null; then
    ln -s ../conf msgrun/conf && trap 'rm -f msgrun/conf' EXIT
fi
$PY -c "import msgrun.conf, hydra, omegaconf; print('msgrun from', msgrun.conf.__path__[0])" || exit 1

# a second, short run redoes one part: PARTS=1 (with PYTEST_ARGS="-k resume", say) or PARTS=2
PARTS=" ${PARTS:-1 2} "
if [[ $PARTS == *" 1 "* ]]; then
    stamp "part 1: correctness on CUDA (pytest -m gpu, limit 210 s)"
    timeout 210 $PY -m pytest -q -m gpu -p no:cacheprovider -rs --durations=8 tests/test_gpu.py ${PYTEST_ARGS:-} 2>&1 \
        | tee "$OUT/pytest_gpu.txt"
    echo "pytest exit: ${PIPESTATUS[0]}"
fi

if [[ $PARTS == *" 2 "* ]]; then
    stamp "part 2: speed against the goals (bench/gpu_goals.py, limit 270 s)"
    # GOALS_ARGS: extra arguments (fewer steps on a rerun; tiny shapes for a CPU dry run, docs/gpu.md)
    timeout 270 $PY bench/gpu_goals.py --out "$OUT/gpu_goals.md" --profile "$OUT/profile.txt" ${GOALS_ARGS:-} 2>&1 \
        | tee "$OUT/gpu_goals.txt"
    echo "gpu_goals exit: ${PIPESTATUS[0]}"
fi

stamp "done; goals:"
sed -n '/## Goals/,$p' "$OUT/gpu_goals.md" 2>/dev/null || echo "(gpu_goals.md was not written: see gpu_goals.txt)"
