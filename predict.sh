#!/bin/sh
# FLARE contract: `sh predict.sh` segments /workspace/inputs/*_0000.nii.gz into /workspace/outputs.
# Locally: ./predict.sh IN_DIR OUT_DIR [options of `python -m app`; ./predict.sh --help lists them]
# Weights: --weights DIR, or WEIGHTS_DIR=DIR in the environment (an explicit --weights wins);
# default weights/.
set -e
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
    ""|-*) set -- /workspace/inputs /workspace/outputs "$@" ;;
esac
if [ -n "${WEIGHTS_DIR:-}" ]; then
    set -- --weights "$WEIGHTS_DIR" "$@"
fi
python=python3
if [ -x "$here/.venv/bin/python" ]; then
    python="$here/.venv/bin/python"
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m app "$@"
