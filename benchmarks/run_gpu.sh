#!/usr/bin/env bash
# All three throughput benchmarks in one prepared run on one GPU (sized for one H100 and a 12-minute session:
# the script itself ends within BENCH_TOTAL_S, default 570 s, and usually in ~8 minutes).
#
# Prepare here (machine with pip access and the shared data), once:
#     bash benchmarks/make_device_bundle.sh          # -> .device/{wheels,site,data} (git-ignored, ~13 MiB)
# Run there (repo root on the GPU machine; through this workplace's device tool):
#     run(command="bash benchmarks/run_gpu.sh", carry=[".device"], timeout_s=600)
#   or on any CUDA box with the project installed:  OUT=results/gpu bash benchmarks/run_gpu.sh
#
# What it does:
#   1. installs the carried wheels into /tmp/medsam2-site (pip --no-index --no-deps --target) and puts the repo,
#      .device/site (sam2, antlr4, iopath: pure Python, sdist-only upstream) and /tmp/medsam2-site on PYTHONPATH.
#      The project is not pip-installed: pyproject pins requires-python <3.12 and the image's python3 is 3.12,
#      and an editable install would need build isolation (no network there); PYTHONPATH is all it needs.
#   2. ingests .device/data/kvasir-seg (~60 real Kvasir-SEG pairs) into /tmp/medsam2-bench/work;
#   3. train_throughput.py --workdir (synthetic + real-data timings, eager bf16 baselines first, hiera_t
#      compile, hiera_l with activation checkpointing), loader_throughput.py (workers 0..16 x augment none/light
#      vs the model-only img/s of the train run), infer_throughput.py (batch 16 @1024, eager vs compiled hiera_t).
#      Each gets a time budget from what is left; every script rewrites its JSON after each variant, so a
#      timeout keeps partial results ("complete": false).
# Output ($OUT, default benchmarks/results/gpu-<UTC time>): train_throughput.json, loader_throughput.json,
# infer_throughput.json, run.log, env.txt (5 files: within the device tool's 8-file limit).
# Smoke test of this script on a CPU box: QUICK=1 INSTALL_WHEELS=0 PYTHON=.venv/bin/python bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-python3}
BENCH_TOTAL_S=${BENCH_TOTAL_S:-570}
WORK=${WORK:-/tmp/medsam2-bench/work}
QUICK=${QUICK:-0}
Q=()
[ "$QUICK" = 1 ] && Q=(--quick)
mkdir -p "$OUT"
T_END=$((SECONDS + BENCH_TOTAL_S))
left() { echo $((T_END - SECONDS)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
echo "== run_gpu.sh $(date -u +%FT%TZ) out=$OUT budget=${BENCH_TOTAL_S}s"

# 1. dependencies
if [ "${INSTALL_WHEELS:-1}" = 1 ] && compgen -G ".device/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medsam2-site \
    .device/wheels/*.whl || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="$PWD:$PWD/.device/site:/tmp/medsam2-site${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "numpy", "sam2", "hydra", "omegaconf", "iopath", "pydantic", "albumentations", "cv2",
             "pandas", "pyarrow", "scipy", "peft"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", exc)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import sys, torch, sam2, medsam2.model.segmenter, medsam2.data.dataset; \
assert torch.cuda.is_available() or sys.argv[1] == '1', 'no CUDA device'" "$QUICK" \
  || { echo "environment not ready (see env.txt)"; exit 1; }

# 2. data: ingest the carried Kvasir pairs (or MEDSAM2_SAMPLE_DATA/kvasir-seg)
SRC=.device/data/kvasir-seg
[ -d "$SRC/images" ] || SRC=${MEDSAM2_SAMPLE_DATA:-../shared/data}/kvasir-seg
DATA_ARGS=()
if [ -d "$SRC/images" ]; then
  rm -rf "$WORK"
  if "$PY" -c "import sys; from medsam2.data.ingest import ingest; r = ingest(sys.argv[1], sys.argv[2], salt='bench'); \
print('ingested', r.rows, 'rows, quarantined', r.quarantined)" "$SRC" "$WORK"; then
    DATA_ARGS=(--workdir "$WORK")
  else
    echo "ingest failed: train/infer fall back to synthetic batches, loader benchmark skipped"
  fi
else
  echo "no Kvasir pairs at $SRC: synthetic batches only, loader benchmark skipped"
fi

run_step() {  # name, hard timeout (s), command...
  local name=$1 tmax=$2; shift 2
  echo "== $name: timeout ${tmax}s, $(left)s left in total"
  timeout --signal=TERM --kill-after=10 "$tmax" "$@" > /dev/null
  local rc=$?
  [ $rc -eq 0 ] || echo "== $name exited with $rc (124 = timeout; its JSON keeps the variants measured so far)"
}

# 3. benchmarks. Train: at most 330 s, leaving >= 150 s for the other two.
T=$(min 330 $(( $(left) - 150 )))
run_step train "$T" "$PY" benchmarks/train_throughput.py "${Q[@]}" "${DATA_ARGS[@]}" --budget-s $((T - 40)) \
  --out "$OUT/train_throughput.json"

if [ ${#DATA_ARGS[@]} -gt 0 ]; then
  T=$(min 100 $(( $(left) - 60 )))
  MODEL_ARGS=()
  [ -s "$OUT/train_throughput.json" ] && MODEL_ARGS=(--model-json "$OUT/train_throughput.json")
  run_step loader "$T" "$PY" benchmarks/loader_throughput.py "${Q[@]}" --workdir "$WORK" "${MODEL_ARGS[@]}" \
    --budget-s $((T - 30)) --out "$OUT/loader_throughput.json"
fi

T=$(( $(left) - 5 ))
if [ "$T" -gt 40 ]; then
  run_step infer "$T" "$PY" benchmarks/infer_throughput.py "${Q[@]}" --budget-s $((T - 25)) --compile-reserve-s 90 \
    --out "$OUT/infer_throughput.json"
else
  echo "== infer skipped: only ${T}s left"
fi

"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*_throughput.json")):
    d = json.loads(p.read_text())
    print(f"== {p.name}: complete={d.get('complete')} device={d['device']['name']} wall={d.get('wall_s')}s")
    for r in d.get("results", []):
        extra = r.get("skipped") or r.get("error") or ""
        if "num_workers" in r:
            print(f"   workers {r['num_workers']:>2} augment {r.get('augment')!s:6} img/s {r.get('img_s')!s:>9} "
                  f"x model {r.get('ratio_to_model')!s:>7} startup {r.get('startup_s')!s:>6}s {extra}")
            continue
        mo = (r.get("model_only") or {}).get("img_s")
        print(f"   {r.get('name')!s:34} img/s {r.get('img_s')!s:>9} model-only {mo!s:>9} mfu {r.get('mfu')!s:>7} "
              f"mem {r.get('peak_mem_gib')!s:>6} GiB compile_s {r.get('compile_s')} {extra}")
    for t in d.get("targets", []):
        print("   target:", t)
EOF
echo "== done in ${SECONDS}s; results in $OUT"
