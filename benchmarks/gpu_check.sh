#!/usr/bin/env bash
# The GPU path, checked in one call: the `gpu` tests (bf16 against float32 for every model, frozen
# towers in bf16, batched GroupNorm speech towers, float32 logits, document cache and GradCache,
# short bf16 fits of the demo recipes) and the real-size benchmarks (late fusion at 3 s and 10 s
# with and without the document cache: examples/s, peak memory, MFU; text-only tokens/s against
# sentence-transformers; evaluation of 4 dims). Everything goes to one markdown file.
#
#   benchmarks/gpu_check.sh [--dry-run] [REPORT]    (default REPORT: gpu_check.md)
#
# Installs nothing: run it where the README's install (with the `bench` extra) is done. Under 8
# minutes on one H200. --dry-run runs the same steps on the CPU at tiny shapes (a few minutes on
# 2 cores), so the plumbing is tested on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPORT=$(realpath -m "${1:-gpu_check.md}")
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 GPU_CHECK_FIGURES="$WORK/figures.jsonl"
# The benchmarks build the demo's tokenizer and tiny models once, here.
export DEMO_DATA_DIR=${DEMO_DATA_DIR:-$WORK/demo}

if ((DRY)); then
    export GPU_CHECK_ON_CPU=1 GPU_CHECK_FIT_STEPS=4
    DEVICE=cpu
    FITS=(-k "not demo_recipe or text_only or late_fusion")  # two of the four fits: the plumbing
    LATE_FUSION=(--device cpu --layers 1 --batch-size 2 --document-tokens 32 --steps 1 --seconds 1 2)
    TEXT_ONLY=(--device cpu --batch-size 8 --steps 4 --warmup 1 --rounds 1 --max-length 32)
    EVALUATION=(--device cpu --queries 20 --documents 100 --max-length 32)
    SPEECH=(--device cpu --batch-size 2 --seconds 1 2 --rounds 1)
else
    DEVICE=cuda
    FITS=()
    LATE_FUSION=(--device cuda --batch-size 64 --document-tokens 512 --steps 10 --seconds 3 10)
    TEXT_ONLY=(--device cuda --bf16 --real-size --batch-size 32 --steps 30 --warmup 5 --rounds 2 --max-length 256)
    EVALUATION=(--device cuda --queries 2000 --documents 20000 --max-length 128 --batch-size 256)
    SPEECH=(--device cuda --dtype bfloat16 --batch-size 16 --seconds 3 10 --rounds 3)
fi

FAILED=()
section() {  # section TITLE COMMAND...: runs it, its output (and any failure) into the report
    local title=$1; shift
    echo "== $title" >&2
    local started=$SECONDS
    { echo; echo "## $title"; echo; echo '```'; } >>"$REPORT"
    "$@" 2>&1 | tee -a "$REPORT" | grep -v -e '^Loading weights' -e '^Writing model' >&2
    local status=${PIPESTATUS[0]}
    { echo '```'; echo; echo "exit status $status, $((SECONDS - started)) s"; } >>"$REPORT"
    ((status == 0)) || FAILED+=("$title")
}

{
    echo "# GPU check $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    "$PYTHON" -c 'import torch, transformers, lightning; print("torch", torch.__version__, "| transformers", transformers.__version__, "| lightning", lightning.__version__); print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)")'
    ((DRY)) && echo "DRY RUN on the CPU: tiny shapes; no figure here is a GPU figure."
} >"$REPORT" 2>&1

section "gpu tests" "$PYTHON" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider "${FITS[@]}"
{ echo; echo "### Measured against their bounds (tests/gpu/bf16_error.py)"; echo; } >>"$REPORT"
"$PYTHON" benchmarks/gpu_figures.py "$GPU_CHECK_FIGURES" >>"$REPORT"
section "real-size late fusion" "$PYTHON" benchmarks/real_size_late_fusion.py "${LATE_FUSION[@]}"
section "text-only vs sentence-transformers" "$PYTHON" benchmarks/text_only_vs_sentence_transformers.py "${TEXT_ONLY[@]}"
section "evaluation of 4 dims vs sentence-transformers" "$PYTHON" benchmarks/evaluation_vs_sentence_transformers.py "${EVALUATION[@]}"
section "speech tower batching" "$PYTHON" benchmarks/speech_tower_batching.py "${SPEECH[@]}"

{ echo; echo "total $SECONDS s on $DEVICE; failed: ${FAILED[*]:-none}"; } >>"$REPORT"
echo "report: $REPORT (total $SECONDS s; failed: ${FAILED[*]:-none})" >&2
((${#FAILED[@]} == 0))
