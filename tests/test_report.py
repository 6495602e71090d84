"""report.py's pieces and the acceleration experiment's speed-up rule, with numbers worked by
hand."""

import json

import pytest

from report import (
    accuracy_curves,
    area_under_curve,
    first_step_reaching,
    padded_limits,
    rollout_seconds,
    seconds_at_step,
    speedup,
    stage_seconds,
)


def accuracies(**by_set) -> dict:
    return {f"eval/{name}/accuracy": value for name, value in by_set.items()}


def test_accuracy_curves_targeted_and_untargeted_means():
    metrics = [
        {"step": 1, "reward": 0.5},  # a training line without evaluation: ignored
        {"step": 0, **accuracies(test_add=0.2, test_sub=0.4, test_max=0.9)},
        {"step": 10, "reward": 0.6, **accuracies(test_add=0.3, test_sub=0.5, test_max=0.7)},
        {"step": 10, **accuracies(test_add=0.0, test_sub=0.0, test_max=0.0)},  # m+1's: skipped
    ]
    curves = accuracy_curves(metrics, targeted=["test_add", "test_sub"])
    assert curves["targeted"] == [(0, 0.30000000000000004), (10, 0.4)]  # (0.2+0.4)/2, (0.3+0.5)/2
    assert curves["untargeted"] == [(0, 0.9), (10, 0.7)]
    assert curves["test_add"] == [(0, 0.2), (10, 0.3)]


def test_padded_limits_keep_a_flat_line_flat():
    lo, hi = padded_limits([0.5, 0.5, 0.5])
    assert hi - lo >= 0.1 and lo < 0.5 < hi  # not zoomed to +-0.001 around 0.5
    assert padded_limits([0.0, 1.0]) == (0.0, 1.0)  # clipped to the accuracy range
    lo, hi = padded_limits([0.2, 0.6])  # wide enough already: 0.02 of margin each side
    assert (round(lo, 6), round(hi, 6)) == (0.18, 0.62)


def test_stage_seconds_reads_done_markers(tmp_path):
    stage = tmp_path / "stage_0"
    stage.mkdir()
    (stage / "sketch_train.done").write_text("30\n")
    (stage / "sketch_val_a.done").write_text("5\n")
    (stage / "select.done").write_text("2\n")
    (stage / "train.done").write_text("63\n0123abcd\n")  # line 2: the settings key
    assert stage_seconds(tmp_path, 0) == {"sketch": 35.0, "select": 2.0, "train": 63.0}
    (
        stage / "rollouts"
    ).mkdir()  # an on-policy run's fresh rollouts: part of the cost of its estimate
    (stage / "rollouts" / "train.done").write_text("40\nkey\n")
    assert stage_seconds(tmp_path, 0) == {"sketch": 75.0, "select": 2.0, "train": 63.0}
    (tmp_path / "rollouts").mkdir()
    for name, seconds in (("train", "100"), ("val_add", "20"), ("val_sub", "25")):
        (tmp_path / "rollouts" / f"{name}.done").write_text(f"{seconds}\nkey\n")
    assert rollout_seconds(tmp_path) == {"train": 100.0, "validation": 45.0}


def test_sketched_prompts_are_the_rows_with_a_gradient(tmp_path):
    from report import sketched_prompts

    assert sketched_prompts(tmp_path, 0) == 0  # a baseline stage: no sketch
    (tmp_path / "stage_0").mkdir()
    (tmp_path / "stage_0" / "train_sketch.json").write_text(
        json.dumps({"rows": 10, "zero_rows": [1, 4, 7]})
    )
    assert sketched_prompts(tmp_path, 0) == 7


def test_speedup_rule():
    full = [
        (0, 0.20),
        (10, 0.30),
        (20, 0.35),
        (30, 0.33),
        (40, 0.35),
    ]  # final 0.35, first reached at step 20
    assert first_step_reaching(full, 0.35) == 20
    assert speedup(full, [(0, 0.2), (10, 0.36), (20, 0.3)]) == 2.0  # 20 / 10
    assert speedup(full, [(0, 0.2), (10, 0.3), (20, 0.3), (40, 0.35)]) == 0.5  # 20 / 40
    assert speedup(full, [(0, 0.2), (40, 0.34)]) == 0.0  # never reached


def test_area_under_curve_by_hand():
    # trapezoids over steps 0-10-20: (0.2+0.4)/2*10 + (0.4+0.4)/2*10 = 3 + 4 = 7,
    # over 20 steps: 0.35
    assert area_under_curve([(0, 0.2), (10, 0.4), (20, 0.4)]) == pytest.approx(0.35)
    assert area_under_curve([(0, 0.5)]) == 0.5


def test_seconds_at_step_counts_rollouts_selection_and_training_so_far():
    times = [
        {"sketch": 10.0, "select": 2.0, "train": 40.0},
        {"sketch": 8.0, "select": 2.0, "train": 20.0},
    ]
    # 4 steps per stage, 30 s of offline rollouts
    assert seconds_at_step(0, 4, times, 30.0) == 30.0  # before any selection
    assert seconds_at_step(2, 4, times, 30.0) == 30 + 12 + 20  # stage 0 selected, half trained
    assert (
        seconds_at_step(4, 4, times, 30.0) == 30 + 12 + 40
    )  # end of stage 0 (stage 1 not selected)
    assert seconds_at_step(5, 4, times, 30.0) == 30 + 52 + 10 + 5  # stage 1 selected, 1 of 4 steps
    assert seconds_at_step(8, 4, times, 0.0) == 52 + 30
