"""bench/accel_bench.py: the bootstrap interval by hand, and a finished (method, seed) run is never
rerun."""

import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import accel_bench  # noqa: E402


def test_bootstrap_interval_by_hand():
    assert accel_bench.bootstrap_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)  # no spread, no interval
    # [0, 1]: a resample's mean is 0 (p = 1/4), 0.5 (1/2) or 1 (1/4); the 2.5% and 97.5% quantiles
    # are 0 and 1
    assert accel_bench.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 0, 1]: the mean of 5 draws is X/5, X ~ Binomial(5, 0.2); P(X = 0) = 0.33 > 2.5%, so
    # the low end is 0; P(X <= 2) = 0.942 < 97.5% <= P(X <= 3) = 0.993, so the high end is 3/5
    assert accel_bench.bootstrap_interval([0.0, 0.0, 0.0, 0.0, 1.0]) == (0.0, pytest.approx(0.6))
    assert accel_bench.bootstrap_interval(
        [0.0, 1.0, 2.0], seed=1
    ) == accel_bench.bootstrap_interval([0.0, 1.0, 2.0], seed=1)


def test_a_finished_run_is_not_rerun_and_an_unfinished_one_is(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")
    finished = tmp_path / "seed0" / "cropi"
    (finished / "rollouts").mkdir(parents=True)
    (finished / "rollouts" / "train.done").write_text("12\nkey\n")
    (finished / "bench.done").write_text("100.0\n")
    calls = []

    def runner(command, **kwargs):
        calls.append(
            (command, kwargs["env"]["METHOD"], kwargs["env"]["SEED"], kwargs["env"]["COMPARE"])
        )

    assert accel_bench.run_one(args, "cropi", 0, runner=runner) == finished
    assert calls == []  # finished: not run again
    out = accel_bench.run_one(args, "full", 0, runner=runner)
    assert calls == [(["bash", "run_cropi.sh"], "full", "0", "")]
    assert (out / "bench.done").exists()
    assert (
        out / "rollouts" / "train.done"
    ).read_text() == "12\nkey\n"  # the seed's rollouts, shared
    accel_bench.run_one(args, "full", 0, runner=runner)
    assert len(calls) == 1  # now finished too


def test_a_failed_run_leaves_no_marker(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")

    def failing(command, **kwargs):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        accel_bench.run_one(args, "cropi", 1, runner=failing)
    assert not (tmp_path / "seed1" / "cropi" / "bench.done").exists()


def test_runs_in_parallel_wait_for_their_seeds_rollouts(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full,learnability", jobs=2)
    events, lock = [], threading.Lock()

    def runner(command, **kwargs):
        env = kwargs["env"]
        with lock:
            events.append(("start", env["METHOD"], env["SEED"]))
        assert env["OMP_NUM_THREADS"] == "1"
        if env["METHOD"] == "cropi":  # makes the seed's offline rollouts
            time.sleep(0.2)
            (Path(env["OUT_DIR"]) / "rollouts").mkdir(parents=True)
            (Path(env["OUT_DIR"]) / "rollouts" / "train.done").write_text(f"seed {env['SEED']}\n")
        with lock:
            events.append(("end", env["METHOD"], env["SEED"]))

    finished = list(
        accel_bench.run_all(args, ["cropi", "full", "learnability"], [0, 1], runner=runner)
    )
    assert sorted((m, s) for m, s, _ in finished) == sorted(
        (m, s) for m in ("cropi", "full", "learnability") for s in (0, 1)
    )
    assert events[:3] == [
        ("start", "cropi", "0"),
        ("end", "cropi", "0"),
        ("start", "cropi", "1"),
    ]  # builds the demo
    assert ("start", "full", "0") in events[3:5]  # then two at once: cropi 1 and the next run
    for seed in (
        "0",
        "1",
    ):  # learnability reads the rollouts: it starts after its seed's cropi run ended
        assert events.index(("end", "cropi", seed)) < events.index(("start", "learnability", seed))
        copied = tmp_path / f"seed{seed}" / "learnability" / "rollouts" / "train.done"
        assert copied.read_text() == f"seed {seed}\n"
