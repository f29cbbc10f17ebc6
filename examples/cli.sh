#!/usr/bin/env bash
# The command-line round trip on any local (base, fine-tune) pair of safetensors model dirs.
#   bash examples/cli.sh BASE_DIR FINETUNED_DIR
set -euo pipefail
BASE=${1:?base model dir}
FT=${2:?fine-tuned model dir}
OUT=${3:-deltahub-cli-example}

deltahub compress "$BASE" "$FT" -o "$OUT/delta" --scale-granularity row --overwrite
deltahub info "$OUT/delta"
deltahub apply "$OUT/delta" --base "$BASE" -o "$OUT/rebuilt" --overwrite
python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$OUT/rebuilt'); print('loads with transformers')"
