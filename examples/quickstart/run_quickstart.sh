#!/bin/sh
# The whole pipeline on a CPU in a few minutes, with nothing to download:
#   1. a tiny random Llama-3.1-shaped HF checkpoint with the real Llama-3 tokenizer
#   2. HF -> megatron-core conversion with the per-layer parity CHECK
#   3. the bundled corpus -> Megatron bin/idx (preprocess_data.py)
#   4. pretraining with the 25-argument launcher (run_mcore_llama3_1.sh)
#   5. SFT on the bundled instruction samples (MP_DATASET_TYPE=raw)
#   6. megatron-core -> HF conversion of the SFT checkpoint
#   7. generation with transformers from the converted model (a tiny random model: junk text)
#   8. the pretraining loss curve as a PNG next to its TensorBoard logs
#   9. lm-eval on the converted model: the bundled offline task mp_tiny_mmlu, a few questions
# Usage: sh examples/quickstart/run_quickstart.sh [OUTPUT_DIR]   (default ./output_quickstart)
# Complete by itself on a fresh clone: first sets up .venv when it is missing or outdated
# (scripts/setup_venv.sh: a few minutes the first time, under a second afterwards).
# Env: PRETRAIN_ITERS (30), SFT_ITERS (5), MP_PYTHON (use that interpreter, no .venv setup).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/scripts/entry_helpers.sh"
mp_help_if_asked "$0" "$@"
case "${1:-}" in
    -*) echo "run_quickstart.sh: error: unknown option '$1' (usage: sh examples/quickstart/run_quickstart.sh [OUTPUT_DIR])" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
    echo "run_quickstart.sh: error: expected at most one argument, OUTPUT_DIR; got $#" >&2
    exit 2
fi
if [ -z "${MP_PYTHON:-}" ]; then
    sh "$ROOT/scripts/setup_venv.sh"
fi
mp_python run_quickstart.sh "$ROOT" || exit 2
PY=$MP_PYTHON
OUT=${1:-$PWD/output_quickstart}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PRETRAIN_ITERS=${PRETRAIN_ITERS:-30}
SFT_ITERS=${SFT_ITERS:-5}
MBS=2; GBS=4; SEQ=128
step() { echo; echo "=== quickstart $1"; }
# a previous run's outputs are replaced (only inside OUT)
rm -rf "$OUT/hf" "$OUT/mcore" "$OUT/data" "$OUT/pretrain" "$OUT/sft" "$OUT/hf_sft" "$OUT/eval"

step "1/9: tiny HF Llama-3.1 checkpoint"
"$PY" "$ROOT/examples/quickstart/make_tiny_llama3.py" "$OUT/hf"

step "2/9: HF -> megatron-core (TP=1 PP=1, fp32) with CHECK"
bash "$ROOT/toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh" \
    tiny "$OUT/hf" "$OUT/mcore" 1 1 false true false fp32

step "3/9: bundled corpus -> bin/idx"
CORPUS=$("$PY" -c "from megatron_patch.data.corpus import bundled_corpus_path; print(bundled_corpus_path())")
"$PY" "$ROOT/toolkits/pretrain_data_preprocessing/preprocess_data.py" --input "$CORPUS" \
    --tokenizer-name-or-path "$OUT/hf" --output-prefix "$OUT/data/corpus" --append-eod \
    --workers 2 --log-interval 0
DATA=$OUT/data/corpus_text_document

step "4/9: pretraining, $PRETRAIN_ITERS iterations (25-argument launcher)"
TOKENS=$((PRETRAIN_ITERS * GBS * SEQ)); WARMUP=$((3 * GBS * SEQ))
sh "$ROOT/examples/llama3_1/run_mcore_llama3_1.sh" dsw tiny $MBS $GBS 1e-3 1e-4 $SEQ $SEQ fp32 \
    1 1 1 false false true false false false $PRETRAIN_ITERS "$DATA" "$DATA" "$OUT/mcore" \
    $TOKENS $WARMUP "$OUT/pretrain"
PRETRAINED=$(ls -d "$OUT"/pretrain/checkpoint/*/ | head -n 1)

step "5/9: SFT, $SFT_ITERS iterations on the bundled instruction samples"
SFT_JSON=$("$PY" -c "from megatron_patch.data.corpus import bundled_sft_path; print(bundled_sft_path())")
MP_DATASET_TYPE=raw sh "$ROOT/examples/llama3_1/run_mcore_llama3_1.sh" dsw tiny $MBS $GBS 1e-4 1e-5 \
    $SEQ $SEQ fp32 1 1 1 false false true true false false $SFT_ITERS "$SFT_JSON" "$SFT_JSON" \
    "$PRETRAINED" $SFT_ITERS 1 "$OUT/sft"
SFTED=$(ls -d "$OUT"/sft/checkpoint/*/ | head -n 1)

step "6/9: megatron-core -> HF"
bash "$ROOT/toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh" \
    tiny "$SFTED" "$OUT/hf_sft" 1 1 true false false fp32 "$OUT/hf"

step "7/9: generate with transformers from the converted model"
"$PY" - "$OUT/hf_sft" <<'PYEOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tok("The Python language reference says", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
print("prompt + 16 greedy tokens:", repr(tok.decode(out[0])))
print("(expected: junk. This is a tiny model with random weights trained for a few iterations "
      "on a CPU; the quickstart checks the pipeline, not the model.)")
PYEOF

step "8/9: the pretraining loss curve (PNG next to the TensorBoard logs)"
"$PY" -m megatron_patch.training.loss_curve "$OUT/pretrain/tensorboard"
CURVE=$(ls "$OUT"/pretrain/tensorboard/*/loss_curve.png)

step "9/9: lm-eval on the converted model (bundled offline task mp_tiny_mmlu, 4 questions per subject)"
MP_PYTHON=$PY sh "$ROOT/LM-Evaluation-Harness/run_eval.sh" "$OUT/hf_sft" mp_tiny_mmlu 4 \
    "$OUT/eval" --limit 4

echo
echo "=== quickstart done. Artefacts:"
echo "  HF checkpoint           $OUT/hf"
echo "  mcore checkpoint        $OUT/mcore"
echo "  pretraining data        $DATA.{bin,idx}"
echo "  pretraining run         $PRETRAINED (logs: $OUT/pretrain/log, tensorboard: $OUT/pretrain/tensorboard)"
echo "  SFT run                 $SFTED"
echo "  HF export of SFT model  $OUT/hf_sft"
echo "  loss curve              $CURVE"
echo "  lm-eval results         $OUT/eval"
