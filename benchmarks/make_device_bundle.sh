#!/usr/bin/env bash
# Build the git-ignored .device/ folder that benchmarks/run_gpu.sh needs on a GPU machine with no network:
#
#   .device/wheels/   wheels (cp312, manylinux x86_64 or pure) of the packages the device image lacks, at the
#                     versions of this checkout's .venv: hydra-core, omegaconf, pydantic(+core,
#                     annotated-types, typing-inspection, typing-extensions), albumentations, albucore, simsimd,
#                     stringzilla. The image already has torch, numpy, opencv-python-headless, pandas, pyarrow,
#                     scipy, pyyaml, pillow, tqdm, portalocker, peft (see /work/.library/device/KINDS.md);
#                     EXTRA="pkg==ver ..." adds more.
#   .device/site/     pure-Python packages published only as sdists, copied from the venv: sam2 (its CUDA
#                     extension is optional and not built; its wheel would be tagged cp311), antlr4 (4.9.3) and
#                     iopath (0.1.10).
#   .device/data/kvasir-seg/{images,masks}/   N_IMAGES (default 60) real Kvasir-SEG pairs from the shared data.
#
# Usage (repo root, on the machine with pip access):  bash benchmarks/make_device_bundle.sh
# Then carry ".device" to the GPU machine and run benchmarks/run_gpu.sh there (see its header).
# Env: PY (python of the venv, default .venv/bin/python), DEVICE_PYTHON (default 3.12), N_IMAGES,
#      MEDSAM2_SAMPLE_DATA (folder holding kvasir-seg/, default ../shared/data), MAX_MIB (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
N_IMAGES=${N_IMAGES:-60}
MAX_MIB=${MAX_MIB:-60}
DATA=${MEDSAM2_SAMPLE_DATA:-../shared/data}
DEV=.device

git check-ignore -q "$DEV/" || { echo "$DEV/ is not git-ignored: add it to .gitignore first" >&2; exit 1; }
rm -rf "$DEV/wheels" "$DEV/site" "$DEV/data"
mkdir -p "$DEV/wheels" "$DEV/site" "$DEV/data/kvasir-seg/images" "$DEV/data/kvasir-seg/masks"

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
for pkg in hydra-core omegaconf pydantic pydantic-core annotated-types typing-inspection \
           typing-extensions albumentations albucore simsimd stringzilla; do
  specs+=("$pkg==$(ver "$pkg")")
done
# shellcheck disable=SC2206
specs+=(${EXTRA:-})
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  plats+=(--platform "$p")
done
echo "downloading: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  "${plats[@]}" -d "$DEV/wheels" "${specs[@]}"

site=$("$PY" -c "import sam2, pathlib; print(pathlib.Path(sam2.__file__).resolve().parents[1])")
for pkg in sam2 antlr4 iopath; do
  cp -r "$site/$pkg" "$DEV/site/"
done
find "$DEV/site" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$DEV/site" -name '*.so' -print -delete  # none expected: the packages must stay pure Python

src="$DATA/kvasir-seg"
[ -d "$src/images" ] || { echo "no Kvasir-SEG at $src (set MEDSAM2_SAMPLE_DATA)" >&2; exit 1; }
n=0
while IFS= read -r img && [ "$n" -lt "$N_IMAGES" ]; do
  name=$(basename "$img")
  [ -f "$src/masks/$name" ] || continue
  cp "$img" "$DEV/data/kvasir-seg/images/"
  cp "$src/masks/$name" "$DEV/data/kvasir-seg/masks/"
  n=$((n + 1))
done < <(find "$src/images" -maxdepth 1 -type f | sort)

ls -1 "$DEV/wheels"
mib=$(du -sm "$DEV" | cut -f1)
echo "$DEV: $n image/mask pairs, $(ls "$DEV/wheels" | wc -l) wheels, site: $(ls "$DEV/site" | tr '\n' ' '), ${mib} MiB"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "$DEV is ${mib} MiB, over ${MAX_MIB} MiB: lower N_IMAGES or drop EXTRA wheels" >&2
  exit 1
fi
