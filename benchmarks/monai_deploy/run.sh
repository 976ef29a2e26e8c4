#!/usr/bin/env bash
# One timed run of the MONAI Deploy spleen app: /usr/bin/time -v for wall and peak RSS.
#
#   benchmarks/monai_deploy/run.sh SERIES_DIR MODEL_TS RUN_DIR [VENV]
#
# Writes RUN_DIR/output/*.dcm (the SEG), RUN_DIR/timings.json (per-operator), RUN_DIR/time_v.txt and
# RUN_DIR/app.log. The stack limit is raised as Holoscan asks (it warns below 32 MB).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SERIES="$1"; MODEL="$2"; RUN="$3"; VENV="${4:-$ROOT/benchmarks/results/mdvenv}"
rm -rf "$RUN"; mkdir -p "$RUN/output"
ulimit -s 32768
/usr/bin/time -v -o "$RUN/time_v.txt" "$VENV/bin/python" "$HERE/app.py" -i "$SERIES" -o "$RUN/output" -m "$MODEL" \
    --timings "$RUN/timings.json" > "$RUN/app.log" 2>&1
grep -E "Elapsed \(wall|Maximum resident" "$RUN/time_v.txt"
