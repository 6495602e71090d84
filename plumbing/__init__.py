"""The plumbing of the CROPI stages: what a reader of the algorithm may skip, one file per concern.

  cli.py            an Args dataclass becomes command-line flags; bad input ends in one line
  files.py          atomic writes, .jsonl, the resumable chunk store, "already done" checks
  data.py           data files (GSM8K, MATH, generic rows), the rollouts schema: errors at file:line
  distributed.py    torchrun processes, the device, autocast, FSDP2 sharding, sharded training state
  models.py         loading models and tokenizers, seeds and RNG state
  memory_plan.py    a stage's estimated peak memory, refused before loading when it does not fit
  engines.py        sampling with generate() or vLLM, one stop-token rule, one weight push
  grad_hooks.py     each prompt's exact gradient out of one forward+backward of many prompts
  sketch_files.py   sketch_grads.py's SKETCH.npy + SKETCH.json, written and read (numpy only)
  grpo_run.py       grpo_train.py's run state: models, optimizer, resume, metrics, checkpoints

cli.py, files.py, data.py and sketch_files.py never import torch (select_data.py needs numpy only).
"""
