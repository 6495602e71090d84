#!/usr/bin/env bash
# CROPI: Curriculum RL with Off-Policy Influence guidance, the whole loop (docs/algorithm.md maps it to the code).
#
#   0.    offline rollouts ONCE from the behaviour policy beta = the initial model            collect_rollouts.py
#   for stage m = 0 .. STAGES-1, with the current checkpoint pi_theta(m):
#   1a-b. POPI gradients of the training and validation prompts, sketched                    sketch_grads.py
#   1c-f. score, fuse the validation sets by reciprocal rank, keep the top RATIO              select_data.py
#   1g.   GRPO on the selected subset for STEPS_PER_STAGE steps -> pi_theta(m+1)             grpo_train.py
# METHOD=cropi_onpolicy collects fresh rollouts of pi_theta(m) before each stage's sketch (step 0 again, stages >= 1);
# the baselines select by their own rule instead of 1a-f; full_dynamic trains on the whole pool with DAPO's dynamic
# sampling (grpo_train.py --dynamic-sampling DYNAMIC_ROUNDS).
#   then a report with plots                                                                  report.py
#
# Configuration: the settings in the table below (printed at start; --help prints the table), from the environment
# or as NAME=VALUE arguments. With no MODEL it runs the embedded CPU demo: a tiny GPT-2 warm-started on a family of
# digit-string tasks (make_demo.py), validation sets aimed at two of its eight skills.
#   PRESET=smoke bash run_cropi.sh      the demo loop in a couple of minutes (the tests use it)
#   NGPU=8 MODEL=... TRAIN_DATA=... VAL_DATA=... TEST_DATA=... bash run_cropi.sh     a GPU node (see README)
# Every finished step leaves OUT_DIR/.../<step>.done (its wall-clock seconds and a key of its settings); a rerun
# skips those made with the same settings, redoes a step whose settings changed and every step after it (saying so),
# and resumes the step that was interrupted (the scripts themselves resume inside long steps).
set -euo pipefail
{  # the whole script is one block, read before it runs: editing this file during a run cannot derail the run
cd "$(dirname "$0")"
fail() { echo "run_cropi.sh: error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------ configuration
# Settings come from the environment or as NAME=VALUE arguments (bash run_cropi.sh STAGES=2 LR=1e-5); a name that is
# not a setting is refused with the nearest one, before anything runs.
known=$(sed -n 's/^setting \([A-Z_]*\) .*/\1/p' run_cropi.sh | tr '\n' ' ')" PRESET PYTHON"
nearest() { python3 -c 'import difflib, sys; print(*difflib.get_close_matches(sys.argv[1], sys.argv[2:], 1, 0.75))' "$1" $known; }
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      echo "usage: [NAME=VALUE ...] bash run_cropi.sh [NAME=VALUE ...]   (settings: name, real model, demo, smoke)"
      sed -n 's/^setting /  /p' run_cropi.sh; exit 0 ;;
    [A-Z]*=*) name=${arg%%=*}
      match=$(nearest "$name"); hint=${match:+did you mean $match?}
      [[ " $known " == *" $name "* ]] || fail "$name: unknown setting; ${hint:-see --help}"
      export "$arg" ;;
    *) fail "$arg: expected NAME=VALUE or --help" ;;
  esac
done
# a misspelt setting in the environment would be ignored without a word: refuse the names near a setting
misspelt=$(python3 -c 'import difflib, re, sys
known = sys.argv[1].split()
for name in sys.argv[2:]:
    match = difflib.get_close_matches(name, known, 1, 0.75)
    if re.fullmatch("[A-Z][A-Z_]*", name) and name not in known and match:
        sys.exit(f"{name}: unknown setting; did you mean {match[0]}?")' "$known" $(compgen -e) 2>&1) || fail "$misspelt"
PRESET=${PRESET:-}
case "$PRESET" in ""|smoke) ;; *) fail "PRESET=$PRESET: expected 'smoke' or unset" ;; esac
[[ $PRESET == smoke && -n "${MODEL:-}" ]] && fail "PRESET=smoke is the embedded demo's small budget; with MODEL=$MODEL \
leave PRESET unset and set the sizes (STAGES, STEPS_PER_STAGE, K, MAX_NEW_TOKENS, ...)"
kind=real; [[ -z "${MODEL:-}" ]] && kind=demo; [[ $kind == demo && $PRESET == smoke ]] && kind=smoke
# setting NAME REAL DEMO [SMOKE]: NAME keeps its value from the environment, else takes the default of this kind of
# run: REAL = the authors' release on a real model, DEMO = the embedded demo, SMOKE = the smoke preset (default DEMO).
setting() {
  local value=$2; [[ $kind != real ]] && value=$3; [[ $kind == smoke && $# -ge 4 ]] && value=$4
  [[ -n "${!1+set}" ]] || printf -v "$1" '%s' "$value"
}
demo_files() { local IFS=,; set -- "${@/#/$DEMO_DIR/data/}"; echo "${*/%/.jsonl}"; }  # a,b -> DIR/data/a.jsonl,...
#       name             real model                demo                     smoke
setting OUT_DIR          runs/cropi                runs/demo                runs/smoke
setting DEMO_DIR         ""                        "$OUT_DIR/demo"
setting MODEL            ""                        "$DEMO_DIR/model"
setting TRAIN_DATA       ""                        "$DEMO_DIR/data/train.jsonl"
setting VAL_DATA         ""                        "$(demo_files val_rot val_swap)"
setting TEST_DATA        ""                        "$(demo_files test_rev test_sort test_rot test_swap test_shift test_skip test_max test_min)"
setting TARGETED         ""                        test_rot,test_swap     # test sets (file stems) the validation aims at
setting SYSTEM_PROMPT    "Please reason step by step, and put your final answer within \\boxed{}." ""
setting METHOD           cropi                     cropi                    # or full, full_dynamic, random, learnability, pass_rate, influence_once, cropi_onpolicy
setting COMPARE          ""                        full                     # other methods trained on the same budget, overlaid in the report
setting STAGES           10                        4                        2
setting STEPS_PER_STAGE  100                       40                       3
setting RATIO            0.1                       0.1                      # share of the pool selected per stage
setting K                8                         8                        # offline responses per training prompt
setting VAL_K            32                        8                        # offline responses per validation prompt
setting VAL_MIN_MIXED    10                        3                        1   # validation prompts with mixed rewards needed
setting TEMPERATURE      0.5                       1.0                      # offline sampling (collect_rollouts.py)
setting ROLLOUT_TEMPERATURE 1.0                    1.0                      # GRPO's own sampling (verl's default)
setting MAX_NEW_TOKENS   2048                      8
setting PROJECTOR        ""                        ""                       # empty: sketch_grads.py's default
setting PROJ_DIM         ""                        ""                       # empty: sketch_grads.py's default
setting SPARSE_RATIO     ""                        ""                       # empty: sketch_grads.py's default
setting VAL_MEAN_OF      100                       100                      # validation prompts averaged into one sketch (0: a sketch per prompt)
setting BATCH_PROMPTS    128                       16                       # GRPO prompts per step
setting GROUP_SIZE       8                         8                        # GRPO responses per prompt
setting LR               1e-6                      1e-4
setting KL_COEF          0.001                     0.001
setting DYNAMIC_ROUNDS   10                        10                       # full_dynamic: most sampling rounds per GRPO step (DAPO)
setting ENTROPY_COEF     0.001                     0.0
setting EVAL_EVERY       50                        10
setting MICRO_BATCH      16384                     65536                    # padded tokens per forward/backward in GRPO
setting SAVE_EVERY       50                        20                       1
setting REPORT_TO        none                      none                     # live curves: none, tensorboard (stage_<m>/tensorboard), wandb, trackio
setting BACKEND          auto                      auto                     # sampler of collect and GRPO: auto (vLLM on CUDA, else hf), vllm, hf
setting DEMO_ARGS        ""                        ""                       "--pool-per-skill 15 --val-per-skill 16 --test-per-skill 8 --warmup-per-skill 100 --warmup-steps 300"
setting NGPU             1                         1                        # processes (GPUs) per node
setting NNODES           1                         1                        # nodes: run this script on each, same settings
setting NODE_RANK        0                         0                        # this node's index, 0 .. NNODES-1
setting MASTER_ADDR      127.0.0.1                 127.0.0.1                # node 0's address (NNODES > 1)
setting MASTER_PORT      29500                     29500                    # a free port on node 0 (NNODES > 1)
setting SEED             0                         0
setting DEMO_SEED        ""                        "$SEED"                  # make_demo.py --seed (bench/accel_bench.py sets it per demo)
setting PIN_ISA          0                         1                        # 1: AVX2 kernels on any x86 CPU and one thread: the same bits on all
PYTHON=${PYTHON:-.venv/bin/python}

# ------------------------------------------------------------------------------------------ checks
is_int()   { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1=$2 is not a whole number"; }
is_float() { [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || fail "$1=$2 is not a number"; }
for v in STAGES STEPS_PER_STAGE K VAL_K VAL_MIN_MIXED VAL_MEAN_OF MAX_NEW_TOKENS BATCH_PROMPTS GROUP_SIZE EVAL_EVERY MICRO_BATCH SAVE_EVERY DYNAMIC_ROUNDS NGPU NNODES NODE_RANK MASTER_PORT SEED; do
  is_int "$v" "${!v}"
done
for v in RATIO TEMPERATURE ROLLOUT_TEMPERATURE LR KL_COEF ENTROPY_COEF; do is_float "$v" "${!v}"; done
(( STAGES >= 1 )) || fail "STAGES must be >= 1"
case "$REPORT_TO" in none|tensorboard|wandb|trackio) ;; *) fail "REPORT_TO=$REPORT_TO: expected none, tensorboard, wandb or trackio" ;; esac
[[ $PIN_ISA == [01] ]] || fail "PIN_ISA=$PIN_ISA: 1 (AVX2 kernels on any x86 CPU, one thread) or 0 (the CPU's own)"
case "$BACKEND" in auto|vllm|hf) ;; *) fail "BACKEND=$BACKEND: expected auto, vllm or hf" ;; esac
awk -v r="$RATIO" 'BEGIN { exit !(r > 0 && r <= 1) }' || fail "RATIO=$RATIO: the share of the pool selected per stage, in (0, 1]"
IFS=, read -ra test_files <<< "$TEST_DATA"
test_stems=(); for f in "${test_files[@]}"; do b=$(basename "$f"); test_stems+=("${b%.*}"); done
IFS=, read -ra targeted <<< "$TARGETED"
for t in "${targeted[@]}"; do  # the report averages these test sets as "targeted": each must be one of TEST_DATA
  [[ " ${test_stems[*]} " == *" $t "* ]] || fail "TARGETED=$TARGETED: $t is not the name of a TEST_DATA file (${test_stems[*]:-none})"
done
(( NGPU >= 1 && NNODES >= 1 && NODE_RANK < NNODES )) || fail "NGPU and NNODES must be >= 1, NODE_RANK < NNODES"
for method in $METHOD ${COMPARE//,/ }; do
  case "$method" in cropi|full|full_dynamic|random|learnability|pass_rate|influence_once|cropi_onpolicy) ;;
    *) fail "METHOD=$METHOD COMPARE=$COMPARE: $method is not one of cropi, full, full_dynamic, random, learnability, pass_rate, influence_once, cropi_onpolicy" ;; esac
done
[[ -n "$TRAIN_DATA" && -n "$VAL_DATA" ]] || fail "set TRAIN_DATA and VAL_DATA (comma-separated files) with MODEL"
[[ -x "$PYTHON" ]] || fail "PYTHON=$PYTHON not found: run 'bash install.sh' first"
[[ $BACKEND != vllm ]] || "$PYTHON" -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("vllm"))' ||
  fail "BACKEND=vllm: vLLM is not installed for $PYTHON (bash install.sh installs it), or set BACKEND=hf"

cat <<EOF
CROPI run ($kind; settings: --help)
  PRESET=${PRESET:-<none>} OUT_DIR=$OUT_DIR METHOD=$METHOD COMPARE=${COMPARE:-<none>} SEED=$SEED NGPU=$NGPU NNODES=$NNODES PIN_ISA=$PIN_ISA
  MODEL=$MODEL
  TRAIN_DATA=$TRAIN_DATA
  VAL_DATA=$VAL_DATA
  TEST_DATA=$TEST_DATA  TARGETED=$TARGETED
  STAGES=$STAGES STEPS_PER_STAGE=$STEPS_PER_STAGE RATIO=$RATIO
  K=$K VAL_K=$VAL_K VAL_MIN_MIXED=$VAL_MIN_MIXED TEMPERATURE=$TEMPERATURE (offline) ROLLOUT_TEMPERATURE=$ROLLOUT_TEMPERATURE (GRPO) MAX_NEW_TOKENS=$MAX_NEW_TOKENS
  PROJECTOR=${PROJECTOR:-<default>} PROJ_DIM=${PROJ_DIM:-<default>} SPARSE_RATIO=${SPARSE_RATIO:-<default>} VAL_MEAN_OF=$VAL_MEAN_OF
  BATCH_PROMPTS=$BATCH_PROMPTS GROUP_SIZE=$GROUP_SIZE LR=$LR KL_COEF=$KL_COEF ENTROPY_COEF=$ENTROPY_COEF DYNAMIC_ROUNDS=$DYNAMIC_ROUNDS
  EVAL_EVERY=$EVAL_EVERY MICRO_BATCH=$MICRO_BATCH SAVE_EVERY=$SAVE_EVERY REPORT_TO=$REPORT_TO BACKEND=$BACKEND
EOF
# PIN_ISA=1: every stage (make_demo.py too) runs in one thread (torch's LayerNorm gradients add up by thread) and, on
# any x86 CPU, with torch's AVX2 kernels and MKL's AVX2 code path (an AVX-512 CPU rounds otherwise): the same bits.
if [[ $PIN_ISA == 1 ]]; then
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  if [[ $(uname -m) == x86_64 ]]; then export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2; fi
fi
# ------------------------------------------------------------------------------------------ helpers
# run_step NAME DONE_FILE OUTPUTS INPUTS command...: run the command unless DONE_FILE holds the same key, and record
# its wall-clock seconds, key and inputs' hashes. The key hashes the command line (paths relative to OUT_DIR; the
# launcher and --report-to/--run-name left out: they change no result; PIN_ISA added), the content of the INPUTS (files or folders
# it reads: data, checkpoints, what the steps before wrote) and the key of the step before, so that a changed setting
# or an input edited in place redoes its step and every later one (saying which input changed); the stale OUTPUTS of
# a redone step are deleted first, and only inside the run's own folders (OUT_DIR, DEMO_DIR). OUTPUTS and INPUTS are
# paths, one per line (see `paths`). DONE_FILE.key marks a started step: it is resumed with the same key or redone.
chain="" ran=0
paths() { printf '%s\n' "$@"; }
content_hashes() {  # a line "<sha256 of the content> PATH" per path (a folder: its files' names and contents)
  local path hash; local -A seen=()
  for path in "$@"; do
    [[ -n "$path" && -z "${seen[$path]+once}" ]] || continue
    seen[$path]=1
    if [[ -d "$path" ]]; then
      hash=$(cd -- "$path" && find . -type f -not -path '*/.*' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum | sha256sum)
    elif [[ -f "$path" ]]; then hash=$(sha256sum < "$path")
    else hash=missing; fi
    echo "${hash:0:16} $path"
  done
}
relative() {  # paths in OUT_DIR written as <OUT_DIR>/...: a run folder can be moved or copied
  awk -v dir="$OUT_DIR" '{ while ((i = index($0, dir)) > 0) $0 = substr($0, 1, i - 1) "<OUT_DIR>" substr($0, i + length(dir)); print }'
}
inside_run() {  # inside_run PATH: PATH lies strictly inside OUT_DIR or DEMO_DIR (whatever characters they hold)
  local path root; path=$(realpath -m -- "$1")
  for root in "$OUT_DIR" "$DEMO_DIR"; do
    [[ -n "$root" ]] || continue
    root=$(realpath -m -- "$root")
    [[ "$path" == "$root"/* ]] && return 0
  done
  return 1
}
run_step() {
  local name=$1 done_file=$2 outputs inputs record key changed reason path; shift 2
  mapfile -t outputs <<< "$1"; mapfile -t inputs <<< "$2"; shift 2
  record=$(echo "after $chain"; content_hashes "${inputs[@]}" | relative)  # what the key covers, besides the command
  key=$({ printf '%s\n' "PIN_ISA=$PIN_ISA" "${@:2}" | sed '/^--\(report-to\|run-name\)$/,+1d' | relative; echo "$record"; } | sha256sum | cut -c1-16)
  chain=$key
  if [[ -f "$done_file" && "$(sed -n 2p "$done_file")" == "$key" ]]; then echo "[skip] $name (done)"; return; fi
  local earlier=$done_file; [[ -f "$done_file" ]] || earlier=$done_file.key
  if [[ -f "$earlier" && "$(sed -n 2p "$earlier")" != "$key" ]]; then
    for path in "${outputs[@]}" "$done_file"; do
      inside_run "$path" || fail "step '$name': will not delete $path, which is outside OUT_DIR=$OUT_DIR"
    done
    changed=$(comm -13 <(sed 1,2d "$earlier" | sort) <(sort <<< "$record"))  # lines of the record that differ
    reason="its settings changed"
    [[ "$changed" == *"after "* ]] && reason="a step before it was redone"
    inputs=$(sed '/^after /d' <<< "$changed" | cut -d' ' -f2- | paste -sd, -)
    [[ -n "$inputs" ]] && reason="its inputs changed since it ran: $inputs"
    echo "[redo] $name: $reason; deleting ${outputs[*]}"
    rm -rf -- "${outputs[@]}" "$done_file"
  fi
  echo "[run ] $name"
  ran=1
  mkdir -p "$(dirname "$done_file")" && printf '%s\n%s\n%s\n' started "$key" "$record" > "$done_file.key"
  local start=$SECONDS
  "$@" || fail "step '$name' failed (exit $?); fix it and rerun: finished steps are kept"
  printf '%s\n%s\n%s\n' $((SECONDS - start)) "$key" "$record" > "$done_file" && rm -f "$done_file.key"
}
# Several GPUs: every stage runs under torchrun, one process per GPU; one node picks a free port by itself
# (--standalone), several meet at MASTER_ADDR:MASTER_PORT. Several nodes need OUT_DIR on storage they share.
launch() {
  if (( NNODES > 1 )); then
    "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
      --master_port="$MASTER_PORT" --nproc_per_node="$NGPU" "$@"
  elif (( NGPU > 1 )); then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" "$@"
  else "$PYTHON" "$@"; fi
}
stem() { local b; b=$(basename "$1"); echo "${b%.*}"; }
files_to_flags() { local flag=$1 f; IFS=, read -ra files <<< "$2"; for f in "${files[@]}"; do printf '%s\n%s\n' "$flag" "$f"; done; }

if [[ $kind != real ]]; then
  is_int DEMO_SEED "$DEMO_SEED"
  read -ra demo_args <<< "$DEMO_ARGS"
  run_step "build the demo task and model" "$DEMO_DIR/demo.done" "$(paths "$DEMO_DIR/model" "$DEMO_DIR/data" "$DEMO_DIR/demo.json")" "" \
    "$PYTHON" make_demo.py --out "$DEMO_DIR" --seed "$DEMO_SEED" "${demo_args[@]}"
fi
# Every input checked before the first expensive step: the model folder (or a hub name), every data file parsed.
if [[ ! -d "$MODEL" ]]; then
  [[ "$MODEL" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$ ]] || fail "MODEL=$MODEL: no such folder (and not a hub name 'org/name')"
fi
IFS=, read -ra data_files <<< "$TRAIN_DATA,$VAL_DATA${TEST_DATA:+,$TEST_DATA}"  # comma-separated: paths may hold spaces
for f in "${data_files[@]}"; do [[ -f "$f" ]] || fail "data file $f not found"; done
"$PYTHON" -c 'import sys
from plumbing.cli import DataError
from plumbing.data import load_examples
for path in sys.argv[1:]:
    try:
        load_examples(path)
    except DataError as e:
        sys.exit(f"run_cropi.sh: error: {e}")' "${data_files[@]}"
IFS=, read -ra val_files <<< "$VAL_DATA"
val_sets=()  # each validation set is named after its file: its rollouts are $R/<name>.jsonl, its sketches <name>_sketch.npy
for f in "${val_files[@]}"; do
  v=$(stem "$f")
  [[ $v != train && " ${val_sets[*]} " != *" $v "* ]] || fail "VAL_DATA: $f: each validation file needs its own name, not 'train'"
  val_sets+=("$v")
done
mapfile -t train_flags < <(files_to_flags --data "$TRAIN_DATA")
mapfile -t test_flags < <([[ -n "$TEST_DATA" ]] && files_to_flags --eval-data "$TEST_DATA")
sketch_flags=()
[[ -n "$PROJECTOR" ]] && sketch_flags+=(--projector "$PROJECTOR")
[[ -n "$PROJ_DIM" ]] && sketch_flags+=(--proj-dim "$PROJ_DIM")
[[ -n "$SPARSE_RATIO" ]] && sketch_flags+=(--sparse-ratio "$SPARSE_RATIO")
R=$OUT_DIR/rollouts

# The steps, one function each; rollouts and sketches are named after their data file (train, or a VAL_DATA stem).
collect() {  # collect ROLLOUT_DIR CHECKPOINT SEED NAME K MIN_MIXED data-flags...
  local dir=$1 checkpoint=$2 seed=$3 name=$4 k=$5 min_mixed=$6; shift 6
  local inputs=("$checkpoint" "${@/#--data/}")  # the model and the data files (each --data flag emptied)
  run_step "collect rollouts: $name" "$dir/$name.done" "$(paths "$dir/$name.jsonl" "$dir/$name.summary.json" "$dir/$name.jsonl.parts")" \
    "$(paths "${inputs[@]}")" \
    launch collect_rollouts.py --model "$checkpoint" "$@" --out "$dir/$name.jsonl" --k "$k" --temperature "$TEMPERATURE" \
      --max-new-tokens "$MAX_NEW_TOKENS" --seed "$seed" --system-prompt "$SYSTEM_PROMPT" --min-mixed "$min_mixed" --backend "$BACKEND"
}
collect_all() {  # collect_all ROLLOUT_DIR CHECKPOINT SEED: K responses per training prompt, VAL_K per validation prompt
  local dir=$1 checkpoint=$2 seed=$3 i
  collect "$dir" "$checkpoint" "$seed" train "$K" 0 "${train_flags[@]}"
  for i in "${!val_files[@]}"; do
    collect "$dir" "$checkpoint" "$seed" "${val_sets[i]}" "$VAL_K" "$VAL_MIN_MIXED" --data "${val_files[i]}"
  done
}
sketch() {  # sketch STAGE_DIR CHECKPOINT ROLLOUT_DIR MEAN_SEED: the pool and every validation set, one model load
  local dir=$1 checkpoint=$2 rollouts=$3 mean_seed=$4 name v outputs=() val_flags=() inputs=("$checkpoint")
  for name in train "${val_sets[@]}"; do
    outputs+=("$dir/${name}_sketch.npy" "$dir/${name}_sketch.json" "$dir/${name}_sketch.npy.parts")
    inputs+=("$rollouts/$name.jsonl")
  done
  for v in "${val_sets[@]}"; do val_flags+=(--val-rollouts "$rollouts/$v.jsonl" --val-out "$dir/${v}_sketch.npy"); done
  run_step "sketch gradients: train and ${#val_sets[@]} validation sets" "$dir/sketch.done" "$(paths "${outputs[@]}")" \
    "$(paths "${inputs[@]}")" \
    launch sketch_grads.py --model "$checkpoint" --rollouts "$rollouts/train.jsonl" --out "$dir/train_sketch.npy" \
      "${val_flags[@]}" --mean-of-rows "$VAL_MEAN_OF" --mean-seed "$mean_seed" --seed "$SEED" "${sketch_flags[@]}"
}
select_top() {  # select_top STAGE_DIR STAGE METHOD ROLLOUT_DIR INPUTS extra-flags...: INPUTS, the files the flags name
  local dir=$1 m=$2 method=$3 rollouts=$4 inputs=$5; shift 5
  run_step "select data ($method)" "$dir/select.done" "$(paths "$dir/subset.jsonl" "$dir/scores.npy" "$dir/selection.json")" \
    "$(paths "$rollouts/train.jsonl" "$inputs")" \
    "$PYTHON" select_data.py --train-rollouts "$rollouts/train.jsonl" "$@" --ratio "$RATIO" --method "$method" \
      --seed "$((SEED + m))" --out "$dir"
  [[ -s "$dir/subset.jsonl" ]] || fail "stage $m selected nothing ($dir/subset.jsonl is empty)"
}
select_stage() {  # select_stage METHOD STAGE_DIR STAGE CHECKPOINT: steps 1a-f for cropi; a baseline's own rule otherwise
  local method=$1 dir=$2 m=$3 checkpoint=$4 rollouts=$R v flags=() sketches=() stage_0
  if [[ $method == cropi_onpolicy && $m -gt 0 ]]; then  # on-policy: fresh rollouts of pi_theta(m) (at stage 0, beta's)
    rollouts=$dir/rollouts
    collect_all "$rollouts" "$checkpoint" "$((SEED + m))"
  fi
  if [[ $method == cropi || $method == cropi_onpolicy || ( $method == influence_once && $m == 0 ) ]]; then
    # 1a-b for the pool; 1c: each validation set's mean over VAL_MEAN_OF sampled prompts, one row (P S is linear)
    sketch "$dir" "$checkpoint" "$rollouts" "$((SEED + m))"
    for v in "${val_sets[@]}"; do flags+=(--val-sketch "$dir/${v}_sketch.npy"); done
    for v in train "${val_sets[@]}"; do sketches+=("$dir/${v}_sketch.npy" "$dir/${v}_sketch.json"); done
    select_top "$dir" "$m" cropi "$rollouts" "$(paths "${sketches[@]}")" --train-sketch "$dir/train_sketch.npy" "${flags[@]}"   # 1c-f
  elif [[ $method == influence_once ]]; then
    stage_0=$(dirname "$dir")/stage_0
    select_top "$dir" "$m" influence_once "$R" "$(paths "$stage_0"/{selection.json,subset.jsonl,scores.npy})" --reuse-selection "$stage_0"
  else
    select_top "$dir" "$m" "${method%_dynamic}" "$R" ""   # full_dynamic: the whole pool, sampled dynamically by GRPO
  fi
}
grpo() {  # grpo STAGE_DIR STAGE CHECKPOINT METHOD
  local dynamic=(); [[ $4 == full_dynamic ]] && dynamic=(--dynamic-sampling "$DYNAMIC_ROUNDS")
  run_step "GRPO: $STEPS_PER_STAGE steps" "$1/train.done" "$(paths "$1/checkpoint" "$1/checkpoint.resume" "$1/metrics.jsonl" "$1/tensorboard" "$1"/checkpoint-*)" \
    "$(paths "$3" "$MODEL" "$1/subset.jsonl" "${test_files[@]}")" \
    launch grpo_train.py --model "$3" --ref-model "$MODEL" --data "$1/subset.jsonl" --steps "$STEPS_PER_STAGE" \
      --step-offset "$(($2 * STEPS_PER_STAGE))" --out "$1/checkpoint" --metrics "$1/metrics.jsonl" \
      "${test_flags[@]}" --eval-every "$EVAL_EVERY" --seed "$((SEED + $2))" --batch-prompts "$BATCH_PROMPTS" \
      --group-size "$GROUP_SIZE" --lr "$LR" --kl-coef "$KL_COEF" --entropy-coef "$ENTROPY_COEF" \
      --temperature "$ROLLOUT_TEMPERATURE" --max-new-tokens "$MAX_NEW_TOKENS" \
      --eval-max-new-tokens "$MAX_NEW_TOKENS" --micro-batch-tokens "$MICRO_BATCH" --save-every "$SAVE_EVERY" \
      --system-prompt "$SYSTEM_PROMPT" --backend "$BACKEND" "${dynamic[@]}" --report-to "$REPORT_TO" --run-name "$(basename "$OUT_DIR")/${1#"$OUT_DIR"/}"
}

# ------------------------------------------------------------------------------------------ the loop
run_stages() {  # run_stages METHOD RUN_DIR: stages 0 .. STAGES-1 of one method, in RUN_DIR/stage_<m>
  local method=$1 run_dir=$2 checkpoint=$MODEL m
  for ((m = 0; m < STAGES; m++)); do
    echo "=== $method: stage $m / $STAGES (checkpoint $checkpoint)"
    select_stage "$method" "$run_dir/stage_$m" "$m" "$checkpoint"   # 1a-f. D(m) = the top RATIO of the pool
    grpo "$run_dir/stage_$m" "$m" "$checkpoint" "$method"            # 1g.   GRPO on D(m): pi_theta(m) -> pi_theta(m+1)
    checkpoint=$run_dir/stage_$m/checkpoint
  done
}

# 0. Offline rollouts of beta = the initial model, once: K per training prompt, VAL_K per validation prompt.
collect_all "$R" "$MODEL" "$SEED"
# 1. The stages; then the methods to compare with, on the same budget (same stages, steps and batch).
run_stages "$METHOD" "$OUT_DIR"
compare_dirs=()
for method in ${COMPARE//,/ }; do run_stages "$method" "$OUT_DIR/compare_$method"; compare_dirs+=("$OUT_DIR/compare_$method"); done

run_step "report" "$OUT_DIR/report.done" "$(paths "$OUT_DIR/report.md")" "" \
  "$PYTHON" report.py --out-dir "$OUT_DIR" --stages "$STAGES" --targeted "$TARGETED" --method "$METHOD" \
    --compare "$(IFS=,; echo "${compare_dirs[*]}")"
if (( ran )); then echo "Done: $OUT_DIR/report.md"; else echo "Already finished: the report is $OUT_DIR/report.md"; fi
exit
}
