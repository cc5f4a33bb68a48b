#!/usr/bin/env bash
# Sets up a virtual environment (CPU build of torch) and runs the end-to-end demo:
# simulate a video, then 'cellulus-scale predict VIDEO OUT' (train on it, estimate the diameter,
# predict blockwise on a local Dask cluster), evaluate, and write a preview.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
PYTHONWARNINGS=ignore python -m pip install --quiet -e .  # no setuptools "editable" notice
cellulus-scale demo "${1:-demo_output}"
