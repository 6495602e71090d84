"""Live curves, as TRL's report_to: each metrics line also goes to TensorBoard, W&B or Trackio."""

from __future__ import annotations

import atexit
import importlib
import os
from pathlib import Path

from plumbing.cli import DataError


def open_tracker(args, folder: Path):
    """TRL's report_to: a function sending a metrics line to TensorBoard (event files in
    folder/tensorboard), W&B or Trackio (project $WANDB_PROJECT / $TRACKIO_PROJECT, else "cropi";
    --run-name GROUP/NAME: run NAME in group GROUP), whose package is imported only when asked."""
    kind = args.report_to
    if kind == "none":
        return lambda row: None
    module = "torch.utils.tensorboard" if kind == "tensorboard" else kind
    try:
        tracker = importlib.import_module(module)
    except ImportError:
        raise DataError(f"--report-to {kind} needs: .venv/bin/pip install {kind}") from None
    if kind == "tensorboard":
        writers, log_dir = [], folder / "tensorboard"

        def send(row: dict) -> None:
            step, values = row["step"], {k: v for k, v in row.items() if k != "step"}
            if not writers:  # opened at the first line: a killed try's events from there on go
                writers.append(tracker.SummaryWriter(log_dir, purge_step=step))
            for key, value in values.items():
                writers[0].add_scalar(key, value, step)
            writers[0].flush()

        return send
    run_name = args.run_name or Path(args.out).name
    group, name = run_name.split("/", 1) if "/" in run_name else (None, run_name)
    project = os.environ.get(f"{kind.upper()}_PROJECT", "cropi")
    options = dict(dir=str(folder)) if kind == "wandb" else {}  # else wandb/ in the working folder
    tracker.init(project=project, group=group, name=name, config=vars(args), **options)
    atexit.register(tracker.finish)  # the run closed before the process ends
    return lambda row: tracker.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
