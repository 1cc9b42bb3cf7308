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
python="${PYTHON:-.venv/bin/python}"
exec "$python" benchmarks/bench_vs_server_metrics.py --guidellm "$venv/bin/guidellm" "$@"
