#!/usr/bin/env bash
# launch/gpu_check.sh [gpu_check options]: the prepared GPU check (engine.tools.gpu_check; README §GPU check).
#   Reuses the machine's CUDA torch: a venv with --system-site-packages (VENV, default .venv-gpu), into which
#   only what is missing from launch/gpu-check-requirements.txt is installed — from WHEELS=dir when set (no
#   index is contacted), else from PyPI. The engine runs from this checkout (PYTHONPATH), not installed.
#   GOLDEN=dir: the golden cases [default: ../shared/golden]. TIMEOUT_S: the hard stop [default 480 s: 8 minutes;
#   the report is written after every step, so a stop keeps what was done].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-gpu}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  case " $* " in
    *" --device cpu "*) ;;  # the dry run needs no GPU
    *) echo "error: $PY has no CUDA torch (install one system-wide; the venv reuses it)" >&2; exit 1 ;;
  esac
fi
pip_args=(-q)
if [ -n "${WHEELS:-}" ]; then
  [ -d "$WHEELS" ] || { echo "error: WHEELS=$WHEELS is not a folder" >&2; exit 1; }
  pip_args+=(--no-index --find-links "$WHEELS")
fi
"$PY" -m pip install "${pip_args[@]}" -r launch/gpu-check-requirements.txt
golden=()
[ -n "${GOLDEN:-}" ] && golden=(--golden "$GOLDEN")
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout --signal=INT "${TIMEOUT_S:-480}" \
  "$PY" -m engine.tools.gpu_check "${golden[@]}" "$@"
