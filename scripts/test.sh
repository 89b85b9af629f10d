#!/usr/bin/env bash
# The whole test gate: lint, format, types, tests (warnings are errors) and coverage.
# Expects scripts/install.sh --dev to have run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

echo "==> ruff check"; ruff check .
echo "==> ruff format --check"; ruff format --check .
echo "==> mypy --strict node"; mypy --strict node
echo "==> pytest (warnings are errors) under coverage"
coverage erase
# pytest's own exit code (5 = no tests collected) fails this script through set -e.
coverage run -m pytest -W error "$@"
echo "==> coverage gate: node/crypto and node/protocol >= 90% of lines"
coverage report --include='node/crypto/*,node/protocol/*' --fail-under=90
