#!/usr/bin/env bash
# Build a separate virtualenv for the MONAI Deploy App SDK anchor (the spleen app), as in
# the MONAI Deploy baseline study (monai-deploy-baseline.md) §1. It never touches the project's own venv.
#
#   benchmarks/monai_deploy/setup.sh [VENV]        (default: benchmarks/results/mdvenv)
#
# Steps (each logged to VENV.log):
#   1. python3 -m venv VENV
#   2. pip install torch==2.13.0 monai-deploy-app-sdk      (torch: the local +cpu wheel when pip finds one)
#   3. pip install monai==1.6.1 pydicom==3.0.2 highdicom==0.28.2 nibabel scikit-image SimpleITK numpy-stl trimesh
#      (the spleen app's requirements; monai 1.6.1 rather than the app's <=1.5.0 pin, which needs torch<2.7)
#   4. a smoke import of monai.deploy, holoscan and the operators the app uses.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/benchmarks/results/mdvenv}"
PY="${PYTHON:-python3}"
LOG="$VENV.log"
mkdir -p "$(dirname "$VENV")"
: > "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }

step "venv $VENV ($($PY --version 2>&1))"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)

TORCH_SPEC="torch==2.13.0"
# Prefer the CPU build (a local wheel on this machine class); the PyPI torch wheel pulls ~3 GB of CUDA libs.
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then TORCH_SPEC="torch==2.13.0+cpu"; fi
step "pip install $TORCH_SPEC monai-deploy-app-sdk"
"${PIP[@]}" "$TORCH_SPEC" monai-deploy-app-sdk >>"$LOG" 2>&1
step "pip install the spleen app's requirements"
"${PIP[@]}" "$TORCH_SPEC" monai==1.6.1 pydicom==3.0.2 highdicom==0.28.2 nibabel scikit-image SimpleITK \
    numpy-stl trimesh >>"$LOG" 2>&1
step "smoke import"
"$VENV/bin/python" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "monai", "holoscan", "monai.deploy", "pydicom", "highdicom"):
    m = importlib.import_module(name)
    print(f"{name:14s} {getattr(m, '__version__', '?')}")
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: F401
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: F401
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator  # noqa: F401
from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator  # noqa: F401
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator  # noqa: F401
print("operators import: ok")
PY
"$VENV/bin/python" -m pip freeze > "$VENV.freeze.txt"
step "done: $VENV (freeze in $VENV.freeze.txt)"
