#!/usr/bin/env bash
# Install everything (scripts/install.sh), then run the full test suite on real QEMU 7.2 and 10.x.
# This is exactly what CI runs (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy --strict vmsnap
exec .venv/bin/pytest -ra --durations=15 "$@"
