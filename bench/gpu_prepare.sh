#!/usr/bin/env bash
# Prepare, on this machine, what a lent GPU machine (the `device` tool) lacks for bench/gpu.sh:
#   .gpu/wheels   agecls's Python packages that its image does not hold (hydra-core, omegaconf, antlr4,
#                 albumentations and its needs, optuna and its needs), as wheels for its Python 3.12 x86-64,
#                 at the versions installed in .venv here. Its image already has torch, torchvision,
#                 lightning, torchmetrics, pandas, numpy, opencv-python-headless, pillow, matplotlib, scipy
#                 and pyyaml; mlflow is not needed there (gpu.sh runs with tracking=none, and agecls imports
#                 mlflow only when tracking is on).
#   .gpu/utkface  every 4th UTKFace file (about 36 MB): ../shared does not travel to that machine, and a call
#                 carries at most 64 MiB in all.
# .gpu/ is git-ignored. Then, with the device tool:
#   run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
# gpu.sh finds .gpu/, installs the wheels into /tmp/site there and uses python3 and .gpu/utkface.
#
#   bench/gpu_prepare.sh [UTKFACE_DIR] [STRIDE]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROOT=${1:-${AGECLS_UTKFACE:-../shared/data/utkface}}
STRIDE=${2:-4}
[ -d "$ROOT" ] || { echo "UTKFace folder not found: $ROOT (first argument or AGECLS_UTKFACE)" >&2; exit 2; }
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/utkface

PACKAGES=(hydra-core omegaconf albumentations albucore pydantic pydantic-core annotated-types typing-inspection
          simsimd stringzilla optuna alembic sqlalchemy greenlet colorlog mako)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in $PY's environment: run make install first" >&2; exit 2; }
  pins+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels "${pins[@]}"
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only: build its pure wheel.
"$PY" -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3

i=0
for f in "$ROOT"/*.jpg; do
  if (( i % STRIDE == 0 )); then cp "$f" .gpu/utkface/; fi
  i=$((i + 1))
done
echo "wheels: $(ls .gpu/wheels | wc -l) files, $(du -sh .gpu/wheels | cut -f1); images: $(ls .gpu/utkface | wc -l)," \
  "$(du -sh .gpu/utkface | cut -f1); .gpu in all: $(du -sh .gpu | cut -f1) (the device tool carries 64 MiB)"
