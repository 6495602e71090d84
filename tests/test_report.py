"""report.py's pieces and the acceleration experiment's speed-up rule, with numbers worked by hand."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from accel_bench import first_step_reaching, speedup  # noqa: E402
from report import accuracy_curves, pass_rate_histogram, stage_seconds  # noqa: E402


def test_accuracy_curves_targeted_and_untargeted_means():
    metrics = [
        {"step": 1, "reward_mean": 0.5},                                       # a training line: ignored
        {"step": 0, "eval": {"test_add": 0.2, "test_sub": 0.4, "test_max": 0.9}},
        {"step": 10, "eval": {"test_add": 0.3, "test_sub": 0.5, "test_max": 0.7}},
        {"step": 10, "eval": {"test_add": 0.0, "test_sub": 0.0, "test_max": 0.0}},  # stage m+1 re-evaluates: skipped
    ]
    curves = accuracy_curves(metrics, targeted=["test_add", "test_sub"])
    assert curves["targeted"] == [(0, 0.30000000000000004), (10, 0.4)]  # (0.2+0.4)/2, (0.3+0.5)/2
    assert curves["untargeted"] == [(0, 0.9), (10, 0.7)]
    assert curves["test_add"] == [(0, 0.2), (10, 0.3)]


def test_pass_rate_histogram_bins():
    # bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]: 1.0 falls in the last (closed) bin
    assert pass_rate_histogram([0.0, 0.125, 0.25, 0.5, 0.5, 0.875, 1.0]) == [2, 1, 2, 0, 2]


def test_stage_seconds_reads_done_markers(tmp_path):
    stage = tmp_path / "stage_0"
    stage.mkdir()
    (stage / "sketch_train.done").write_text("30\n")
    (stage / "sketch_val_a.done").write_text("5\n")
    (stage / "select.done").write_text("2\n")
    (stage / "train.done").write_text("63\n")
    assert stage_seconds(tmp_path, 0) == {"sketch": 35.0, "select": 2.0, "train": 63.0}


def test_speedup_rule():
    full = [(0, 0.20), (10, 0.30), (20, 0.35), (30, 0.33), (40, 0.35)]  # final 0.35, first reached at step 20
    assert first_step_reaching(full, 0.35) == 20
    assert speedup(full, [(0, 0.2), (10, 0.36), (20, 0.3)]) == 2.0        # 20 / 10
    assert speedup(full, [(0, 0.2), (10, 0.3), (20, 0.3), (40, 0.35)]) == 0.5  # 20 / 40
    assert speedup(full, [(0, 0.2), (40, 0.34)]) == 0.0                  # never reached
