#!/usr/bin/env bash
# GuideLLM against `sloserve serve`: its TTFT/ITL beside `sloserve bench`'s and the server's own histograms.
# GuideLLM is not a dependency of sloserve: it goes into its own virtual environment (GUIDELLM_VENV), once.
#
#   bash benchmarks/guidellm_check.sh [--num-prompts 40] [--request-rate 4]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GUIDELLM_VENV:-${TMPDIR:-/tmp}/sloserve-guidellm-venv}"
if [[ ! -x "$venv/bin/guidellm" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "guidellm>=0.8.1,<0.9"
fi
# GuideLLM's defaults (10 worker processes, loops polling every 0.1 ms) would take the cores from the server
# it measures on a small machine: one worker and a 1 ms poll leave the server its CPU.
export GUIDELLM__MAX_WORKER_PROCESSES="${GUIDELLM__MAX_WORKER_PROCESSES:-1}"
export GUIDELLM__DEFAULT_ASYNC_LOOP_SLEEP="${GUIDELLM__DEFAULT_ASYNC_LOOP_SLEEP:-0.001}"
python="${PYTHON:-.venv/bin/python}"
exec "$python" benchmarks/bench_vs_server_metrics.py --guidellm "$venv/bin/guidellm" "$@"
