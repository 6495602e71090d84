#!/usr/bin/env bash
# CROPI: Curriculum RL with Off-Policy Influence guidance, the whole loop (../shared/notes/cropi-reference.md).
#
#   0.  collect offline rollouts ONCE from the behaviour policy beta = the initial model   (collect_rollouts.py)
#   for stage m = 0 .. STAGES-1, with the current checkpoint pi_theta(m):
#   1a-b. POPI gradients of train and validation prompts, sketched                      (sketch_grads.py)
#   1c-f. score, fuse the validation sets by reciprocal rank, keep the top RATIO          (select_data.py)
#   1g.   GRPO on the selected subset for STEPS_PER_STAGE steps -> pi_theta(m+1)         (grpo_train.py)
#   then a report with plots                                                             (report.py)
#
# Configuration is by environment variables (printed at start). With none it runs the embedded CPU demo:
# a tiny GPT-2 warm-started on an arithmetic task (make_demo.py), validation sets aimed at two of its four skills.
#   PRESET=smoke bash run_cropi.sh      the whole loop in a couple of minutes (tests use it)
#   NGPU=8 MODEL=... TRAIN_DATA=... VAL_DATA=... TEST_DATA=... bash run_cropi.sh     a GPU node (see README)
# Every finished step leaves OUT_DIR/.../<step>.done (holding its wall-clock seconds); a rerun skips those and
# redoes only the step that was interrupted (the scripts themselves resume inside long steps).
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "run_cropi.sh: error: $*" >&2; exit 1; }

PRESET=${PRESET:-}
case "$PRESET" in
  "")    preset_stages=4; preset_steps=40; preset_out=runs/demo; preset_save_every=20; demo_args=() ;;
  smoke) preset_stages=2; preset_steps=3;  preset_out=runs/smoke; preset_save_every=1
         demo_args=(--pool-per-skill 30 --val-per-skill 16 --test-per-skill 8 --warmup-steps 300) ;;
  *)     fail "PRESET=$PRESET: expected 'smoke' or unset" ;;
esac

# ------------------------------------------------------------------------------------------ configuration
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-$preset_out}
MODEL=${MODEL:-}                                  # empty: the embedded demo model
DEMO_DIR=${DEMO_DIR:-$OUT_DIR/demo}
if [[ -z "$MODEL" ]]; then
  MODEL=$DEMO_DIR/model
  d=$DEMO_DIR/data
  TRAIN_DATA=${TRAIN_DATA:-$d/train.jsonl}
  VAL_DATA=${VAL_DATA:-$d/val_add.jsonl,$d/val_sub.jsonl}
  TEST_DATA=${TEST_DATA:-$d/test_add.jsonl,$d/test_sub.jsonl,$d/test_mul.jsonl,$d/test_max.jsonl}
  TARGETED=${TARGETED:-test_add,test_sub}
  SYSTEM_PROMPT=${SYSTEM_PROMPT-}                 # the demo tokenizer's chat template ignores it anyway
  : "${MAX_NEW_TOKENS:=8}" "${TEMPERATURE:=1.0}" "${LR:=2e-4}" "${BATCH_PROMPTS:=16}" "${KL_COEF:=0.001}"
  : "${ENTROPY_COEF:=0.0}" "${VAL_K:=8}" "${EVAL_EVERY:=10}" "${MICRO_BATCH:=256}"
fi
TRAIN_DATA=${TRAIN_DATA:?set TRAIN_DATA (comma-separated .jsonl/.parquet files) when MODEL is set}
VAL_DATA=${VAL_DATA:?set VAL_DATA (comma-separated; each file is one validation set)}
TEST_DATA=${TEST_DATA:-}                          # comma-separated eval sets; accuracy logged during GRPO
TARGETED=${TARGETED:-}                            # which test sets (by file stem) the validation sets aim at
SYSTEM_PROMPT=${SYSTEM_PROMPT-"Please reason step by step, and put your final answer within \\boxed{}."}
METHOD=${METHOD:-cropi}                           # cropi | full | random | learnability | pass_rate | influence_once
STAGES=${STAGES:-$preset_stages}
STEPS_PER_STAGE=${STEPS_PER_STAGE:-$preset_steps}
RATIO=${RATIO:-0.1}                               # share of the pool selected per stage
K=${K:-8}                                         # offline responses per training prompt (release: 8)
VAL_K=${VAL_K:-32}                                # offline responses per validation prompt (release: 32)
TEMPERATURE=${TEMPERATURE:-0.5}                   # offline sampling temperature (release: 0.5)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-2048}
PROJECTOR=${PROJECTOR:-}                          # empty: sketch_grads.py's default
PROJ_DIM=${PROJ_DIM:-}                            # empty: sketch_grads.py's default
SPARSE_RATIO=${SPARSE_RATIO:-}                    # kept fraction before projection; empty: the script's default
BATCH_PROMPTS=${BATCH_PROMPTS:-128}               # GRPO prompts per step (release: 128)
GROUP_SIZE=${GROUP_SIZE:-8}                       # GRPO responses per prompt (release: 8)
LR=${LR:-1e-6}
KL_COEF=${KL_COEF:-0.001}
ENTROPY_COEF=${ENTROPY_COEF:-0.001}
EVAL_EVERY=${EVAL_EVERY:-50}
MICRO_BATCH=${MICRO_BATCH:-16}                    # sequences per forward/backward pass in GRPO
SAVE_EVERY=${SAVE_EVERY:-$preset_save_every}      # GRPO resume checkpoint interval (steps)
NGPU=${NGPU:-1}
SEED=${SEED:-0}

# ------------------------------------------------------------------------------------------ checks
is_int()   { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1=$2 is not a whole number"; }
is_float() { [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || fail "$1=$2 is not a number"; }
for v in STAGES STEPS_PER_STAGE K VAL_K MAX_NEW_TOKENS BATCH_PROMPTS GROUP_SIZE EVAL_EVERY MICRO_BATCH SAVE_EVERY NGPU SEED; do
  is_int "$v" "${!v}"
done
for v in RATIO TEMPERATURE LR KL_COEF ENTROPY_COEF; do is_float "$v" "${!v}"; done
(( STAGES >= 1 )) || fail "STAGES must be >= 1"
(( NGPU >= 1 )) || fail "NGPU must be >= 1"
case "$METHOD" in cropi|full|random|learnability|pass_rate|influence_once) ;;
  *) fail "METHOD=$METHOD: expected cropi, full, random, learnability, pass_rate or influence_once" ;; esac
[[ -x "$PYTHON" ]] || fail "PYTHON=$PYTHON not found: run 'bash install.sh' first"

cat <<EOF
CROPI run (edit by environment variables)
  PRESET=${PRESET:-<none>} OUT_DIR=$OUT_DIR METHOD=$METHOD SEED=$SEED NGPU=$NGPU
  MODEL=$MODEL
  TRAIN_DATA=$TRAIN_DATA
  VAL_DATA=$VAL_DATA
  TEST_DATA=$TEST_DATA  TARGETED=$TARGETED
  STAGES=$STAGES STEPS_PER_STAGE=$STEPS_PER_STAGE RATIO=$RATIO
  K=$K VAL_K=$VAL_K TEMPERATURE=$TEMPERATURE MAX_NEW_TOKENS=$MAX_NEW_TOKENS
  PROJECTOR=${PROJECTOR:-<default>} PROJ_DIM=${PROJ_DIM:-<default>} SPARSE_RATIO=${SPARSE_RATIO:-<default>}
  BATCH_PROMPTS=$BATCH_PROMPTS GROUP_SIZE=$GROUP_SIZE LR=$LR KL_COEF=$KL_COEF ENTROPY_COEF=$ENTROPY_COEF
  EVAL_EVERY=$EVAL_EVERY MICRO_BATCH=$MICRO_BATCH SAVE_EVERY=$SAVE_EVERY
EOF

if [[ -f "$OUT_DIR/report.done" ]]; then
  echo "Already finished: the report is $OUT_DIR/report.md"
  exit 0
fi

# run_step NAME DONE_FILE command...: skip when DONE_FILE exists, else run and record its wall-clock seconds.
run_step() {
  local name=$1 done_file=$2; shift 2
  if [[ -f "$done_file" ]]; then echo "[skip] $name (done)"; return; fi
  echo "[run ] $name"
  local start=$SECONDS
  "$@" || fail "step '$name' failed (exit $?); fix it and rerun: finished steps are kept"
  mkdir -p "$(dirname "$done_file")"
  echo $((SECONDS - start)) > "$done_file"
}
# Multi-GPU: the gradient and training stages go through torchrun, one process per GPU.
launch() { if (( NGPU > 1 )); then "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" "$@"; else "$PYTHON" "$@"; fi; }
files_to_flags() { local flag=$1; IFS=, read -ra files <<< "$2"; for f in "${files[@]}"; do printf '%s\n%s\n' "$flag" "$f"; done; }
stem() { local b; b=$(basename "$1"); echo "${b%.*}"; }

# ------------------------------------------------------------------------------------------ the demo model
if [[ "$MODEL" == "$DEMO_DIR/model" ]]; then
  run_step "build the demo task and model" "$DEMO_DIR/demo.done" \
    "$PYTHON" make_demo.py --out "$DEMO_DIR" --seed "$SEED" "${demo_args[@]}"
fi
for f in ${TRAIN_DATA//,/ } ${VAL_DATA//,/ } ${TEST_DATA//,/ }; do [[ -f "$f" ]] || fail "data file $f not found"; done
[[ -e "$MODEL" || "$MODEL" == */* ]] || fail "MODEL=$MODEL: no such folder (and not a hub name)"

mapfile -t train_flags < <(files_to_flags --data "$TRAIN_DATA")
mapfile -t test_flags < <([[ -n "$TEST_DATA" ]] && files_to_flags --eval-data "$TEST_DATA")
optional=()
[[ -n "$PROJECTOR" ]] && optional+=(--projector "$PROJECTOR")
[[ -n "$PROJ_DIM" ]] && optional+=(--proj-dim "$PROJ_DIM")
[[ -n "$SPARSE_RATIO" ]] && optional+=(--sparse-ratio "$SPARSE_RATIO")
IFS=, read -ra val_files <<< "$VAL_DATA"

# ------------------------------------------------------------------------------------------ 0. offline rollouts
R=$OUT_DIR/rollouts
collect() {  # collect NAME K data-flags...
  local name=$1 k=$2; shift 2
  run_step "collect rollouts: $name" "$R/$name.done" \
    "$PYTHON" collect_rollouts.py --model "$MODEL" "$@" --out "$R/$name.jsonl" --k "$k" \
      --temperature "$TEMPERATURE" --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" \
      --system-prompt "$SYSTEM_PROMPT" --num-gpus "$NGPU"
}
collect train "$K" "${train_flags[@]}"
for f in "${val_files[@]}"; do collect "val_$(stem "$f")" "$VAL_K" --data "$f"; done

# ------------------------------------------------------------------------------------------ 1. the stages
checkpoint=$MODEL
for ((m = 0; m < STAGES; m++)); do
  S=$OUT_DIR/stage_$m
  echo "=== stage $m / $STAGES (checkpoint $checkpoint)"

  # 1a-b. POPI gradients on the current checkpoint, sketched. Only cropi needs them (influence_once: stage 0 only).
  select_flags=()
  if [[ "$METHOD" == cropi || ( "$METHOD" == influence_once && $m == 0 ) ]]; then
    sketch() {  # sketch NAME ROLLOUTS
      run_step "sketch gradients: $1" "$S/sketch_$1.done" \
        launch sketch_grads.py --model "$checkpoint" --rollouts "$2" --out "$S/$1_sketch.npy" --seed "$SEED" \
          "${optional[@]}"
    }
    sketch train "$R/train.jsonl"
    select_flags+=(--train-sketch "$S/train_sketch.npy")
    for f in "${val_files[@]}"; do
      sketch "val_$(stem "$f")" "$R/val_$(stem "$f").jsonl"
      select_flags+=(--val-sketch "$S/val_$(stem "$f")_sketch.npy")
    done
    method=cropi
  elif [[ "$METHOD" == influence_once ]]; then
    select_flags+=(--reuse-selection "$OUT_DIR/stage_0"); method=influence_once
  else
    method=$METHOD
  fi

  # 1c-f. Select the top RATIO of the pool.
  run_step "select data ($method)" "$S/select.done" \
    "$PYTHON" select_data.py --train-rollouts "$R/train.jsonl" "${select_flags[@]}" --ratio "$RATIO" \
      --method "$method" --seed "$((SEED + m))" --out "$S"
  [[ -s "$S/subset.jsonl" ]] || fail "stage $m selected nothing ($S/subset.jsonl is empty)"

  # 1g. GRPO on the subset, starting from the current checkpoint.
  run_step "GRPO: $STEPS_PER_STAGE steps" "$S/train.done" \
    launch grpo_train.py --model "$checkpoint" --ref-model "$MODEL" --data "$S/subset.jsonl" \
      --steps "$STEPS_PER_STAGE" --step-offset "$((m * STEPS_PER_STAGE))" --out "$S/checkpoint" \
      --metrics "$S/metrics.jsonl" "${test_flags[@]}" --eval-every "$EVAL_EVERY" --seed "$((SEED + m))" \
      --batch-prompts "$BATCH_PROMPTS" --group-size "$GROUP_SIZE" --lr "$LR" --kl-coef "$KL_COEF" \
      --entropy-coef "$ENTROPY_COEF" --max-new-tokens "$MAX_NEW_TOKENS" --eval-max-new-tokens "$MAX_NEW_TOKENS" \
      --micro-batch-size "$MICRO_BATCH" --save-every "$SAVE_EVERY" --system-prompt "$SYSTEM_PROMPT"
  checkpoint=$S/checkpoint
  # All stages' metrics so far, in one file.
  cat "$OUT_DIR"/stage_*/metrics.jsonl > "$OUT_DIR/.metrics.jsonl.tmp" && mv "$OUT_DIR/.metrics.jsonl.tmp" "$OUT_DIR/metrics.jsonl"
done

# ------------------------------------------------------------------------------------------ report
run_step "report" "$OUT_DIR/report.done" \
  "$PYTHON" report.py --out-dir "$OUT_DIR" --stages "$STAGES" --targeted "$TARGETED" --method "$METHOD"
echo "Done: $OUT_DIR/report.md"
