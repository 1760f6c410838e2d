#!/usr/bin/env bash
# Here, on the CPU machine, before a GPU run: put the pure-Python packages msgrun needs and the
# GPU machine's image lacks (Hydra, OmegaConf, ANTLR's runtime) into .gpu_deps/, git-ignored, for
# the device call to carry (carry: [".gpu_deps"]). They are copied from this venv: ANTLR's
# runtime 4.9.3, which Hydra pins, exists on PyPI only as a source archive, not as a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
rm -rf .gpu_deps && mkdir .gpu_deps
python - <<'PY'
import importlib, pathlib, shutil
for name in ("hydra", "omegaconf", "antlr4"):
    src = pathlib.Path(importlib.import_module(name).__file__).parent
    shutil.copytree(src, pathlib.Path(".gpu_deps") / name, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"{name}: {src}")
PY
du -sh .gpu_deps
