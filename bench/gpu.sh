#!/usr/bin/env bash
# The one prepared GPU check, for a lent H100/H200: under 10 minutes, no downloads.
#
#   bench/gpu.sh [UTKFACE_DIR] [OUT_DIR]
#
# Needs: agecls installed in .venv (or PYTHON=...), CUDA visible, and the UTKFace folder on that machine
# (AGECLS_UTKFACE or the first argument; default ../shared/data/utkface). Writes its logs, results and an
# nvidia-smi utilisation trace under OUT_DIR (default $OUT when set, else outputs/bench/gpu).
#   1. bench/throughput.py at 224 px: train images/s of the final AGECNN through agecls for the GPU-path
#      settings (DataLoader + albumentations fp32; + bf16 + channels_last; the device pipeline; + compile);
#   2. one AGECNN run at 224 px on the fastest path (data.pipeline=device, bf16, channels_last), 3 epochs
#      with validation: epoch time from its results.json, GPU utilisation from the trace;
#   3. a short sweep: the quality bench at 224 px (bench/quality.py --size 224: dissertation vs an agecls
#      study under an equal budget of whole-split epochs, bootstrap CIs), its wall time;
#   4. trials sharing the GPU: the same 6-trial study of the demo CNN (64 px, forked from the trial template)
#      with optuna.trials_per_device=1 and =2, its wall time and each trial's recorded device.
#
# On a machine lent through the device tool: prepare .gpu/ here first (bench/gpu_prepare.sh: the missing
# packages as wheels and every 4th UTKFace file), then run(command="bash bench/gpu.sh", carry=[".gpu"]).
# When .gpu/ is present this script installs its wheels into /tmp/site and uses python3 and .gpu/utkface.
# Back here: python bench/throughput.py --from-json <files_at>/throughput.json --write BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/wheels ] && [ ! -x .venv/bin/python ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  PYTHON=${PYTHON:-python3}
  AGECLS_UTKFACE=${AGECLS_UTKFACE:-.gpu/utkface}
fi
PYTHON=${PYTHON:-.venv/bin/python}
ROOT=${1:-${AGECLS_UTKFACE:-../shared/data/utkface}}
OUT_DIR=${2:-${OUT:-outputs/bench/gpu}}
WORKERS=${WORKERS:-12}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 AGECLS_OUTPUT_DIR=${AGECLS_OUTPUT_DIR:-outputs/gpu}

[ -d "$ROOT" ] || { echo "UTKFace folder not found: $ROOT (first argument or AGECLS_UTKFACE)" >&2; exit 2; }
"$PYTHON" - <<'EOF' || { echo "CUDA is not available to $PYTHON: this script is for a GPU machine" >&2; exit 2; }
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
  > "$OUT_DIR/gpu_util.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT

COMMON=(data=utkface "data.root=$ROOT" "data.num_workers=$WORKERS" trainer.precision=bf16-mixed
        trainer.enable_progress_bar=false tracking=none)

echo ">> 1. throughput at 224 px (bench/throughput.py)" | tee -a "$OUT_DIR/summary.txt"
timeout 240 "$PYTHON" bench/throughput.py --root "$ROOT" --size 224 --workers "$WORKERS" --out "$OUT_DIR" \
  > "$OUT_DIR/throughput.log" 2>&1 || echo "throughput bench did not finish cleanly (see throughput.log)" \
  | tee -a "$OUT_DIR/summary.txt"
grep -E "train images/s|FAILED" "$OUT_DIR/throughput.log" | tee -a "$OUT_DIR/summary.txt" || true

FAST=(data.pipeline=device trainer.channels_last=true)
echo ">> 2. AGECNN at 224 px, 3 epochs, ${FAST[*]} bf16-mixed" | tee -a "$OUT_DIR/summary.txt"
start=$(date +%s)
timeout 120 "$PYTHON" -m agecls.cli.train experiment=agecnn "${COMMON[@]}" "${FAST[@]}" trainer.max_epochs=3 \
  callbacks.early_stopping.enabled=false "hydra.run.dir=$OUT_DIR/agecnn224" > "$OUT_DIR/agecnn224.log" 2>&1 \
  || echo "the AGECNN run did not finish (see agecnn224.log)" | tee -a "$OUT_DIR/summary.txt"
echo "wall $(( $(date +%s) - start )) s (data preparation included)" | tee -a "$OUT_DIR/summary.txt"
"$PYTHON" - "$OUT_DIR" <<'PYEOF' | tee -a "$OUT_DIR/summary.txt" || true
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = json.loads((out / "agecnn224" / "results.json").read_text())
n, s, e = r["data_sizes"]["train"], r["fit_seconds"], r["epochs_trained"]
print(f"fit {s:.1f} s for {e} epochs of {n} training images (+ validation each epoch): "
      f"{s / e:.1f} s per epoch, {n * e / s:.0f} train images/s including validation")
util = [float(row[1].strip().split()[0]) for row in csv.reader(open(out / "gpu_util.csv")) if len(row) > 2]
if util:
    busy = [u for u in util if u > 0]
    print(f"GPU utilisation over the script so far: mean {sum(util) / len(util):.0f}%, "
          f"mean while busy {sum(busy) / max(len(busy), 1):.0f}% ({len(util)} samples every 0.5 s)")
PYEOF

echo ">> 3. a short sweep: quality bench at 224 px" | tee -a "$OUT_DIR/summary.txt"
start=$(date +%s)
timeout 200 "$PYTHON" bench/quality.py --root "$ROOT" --size 224 --budget 4 --epochs 2 --fraction 1.0 \
  --threads 4 --workers "$WORKERS" --set trainer.precision=bf16-mixed tracking.enabled=false "${FAST[@]}" \
  --agecls-set callbacks.ema.enabled=true callbacks.ema.decay=0.995 augment.tta=auto --out "$OUT_DIR/quality" \
  > "$OUT_DIR/quality.log" 2>&1 || echo "quality bench did not finish (see quality.log)" | tee -a "$OUT_DIR/summary.txt"
echo "quality bench wall $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"
cp "$OUT_DIR"/quality/*/quality.json "$OUT_DIR/quality-224px.json" 2>/dev/null || true
tail -n 30 "$OUT_DIR/quality.log"

echo ">> 4. trials per device: a 6-trial demo study, 1 then 2 trials on the GPU at once" | tee -a "$OUT_DIR/summary.txt"
for per in 1 2; do
  start=$(date +%s)
  timeout 40 "$PYTHON" -m agecls.cli.train -m experiment=demo sweep=demo optuna/pruner=none optuna.n_trials=6 \
    optuna.devices=[0] optuna.trials_per_device=$per optuna.study_name=share$per optuna.register_best=false \
    trainer.max_epochs=2 tracking=none "optuna.storage=sqlite:///$OUT_DIR/share.db" \
    > "$OUT_DIR/share$per.log" 2>&1 || echo "trials_per_device=$per did not finish (see share$per.log)" \
    | tee -a "$OUT_DIR/summary.txt"
  echo "trials_per_device=$per: wall $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"
done
"$PYTHON" - "$OUT_DIR" <<'PYEOF' | tee -a "$OUT_DIR/summary.txt" || true
import sys
import optuna
for per in (1, 2):
    study = optuna.load_study(study_name=f"share{per}", storage=f"sqlite:///{sys.argv[1]}/share.db")
    done = [t for t in study.trials if t.datetime_complete]
    wall = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    fit = sum(t.user_attrs.get("fit_seconds", 0) for t in done)
    devices = sorted({str(t.user_attrs.get("device")) for t in done})
    print(f"trials_per_device={per}: {len(done)} trials in {wall:.1f} s (fit {fit:.1f} s), devices {devices}")
PYEOF
cat "$OUT_DIR/summary.txt"
