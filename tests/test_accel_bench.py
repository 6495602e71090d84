"""bench/accel_bench.py: the bootstrap interval by hand, and a finished (method, seed) run is never rerun."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import accel_bench  # noqa: E402


def test_bootstrap_interval_by_hand():
    assert accel_bench.bootstrap_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)  # no spread, no interval
    # [0, 1]: a resample's mean is 0 (p = 1/4), 0.5 (1/2) or 1 (1/4); the 2.5% and 97.5% quantiles are 0 and 1
    assert accel_bench.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 0, 1]: the mean of 5 draws is X/5, X ~ Binomial(5, 0.2); P(X = 0) = 0.33 > 2.5%, so the low end is
    # 0; P(X <= 2) = 0.942 < 97.5% <= P(X <= 3) = 0.993, so the high end is 3/5
    assert accel_bench.bootstrap_interval([0.0, 0.0, 0.0, 0.0, 1.0]) == (0.0, pytest.approx(0.6))
    assert accel_bench.bootstrap_interval([0.0, 1.0, 2.0], seed=1) == accel_bench.bootstrap_interval([0.0, 1.0, 2.0],
                                                                                                    seed=1)


def test_a_finished_run_is_not_rerun_and_an_unfinished_one_is(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")
    finished = tmp_path / "seed0" / "cropi"
    (finished / "rollouts").mkdir(parents=True)
    (finished / "rollouts" / "train.done").write_text("12\nkey\n")
    (finished / "bench.done").write_text("100.0\n")
    calls = []

    def runner(command, **kwargs):
        calls.append((command, kwargs["env"]["METHOD"], kwargs["env"]["SEED"], kwargs["env"]["COMPARE"]))

    assert accel_bench.run_one(args, "cropi", 0, runner=runner) == finished
    assert calls == []  # finished: not run again
    out = accel_bench.run_one(args, "full", 0, runner=runner)
    assert calls == [(["bash", "run_cropi.sh"], "full", "0", "")]
    assert (out / "bench.done").exists()
    assert (out / "rollouts" / "train.done").read_text() == "12\nkey\n"  # the seed's rollouts, shared
    accel_bench.run_one(args, "full", 0, runner=runner)
    assert len(calls) == 1  # now finished too


def test_a_failed_run_leaves_no_marker(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")

    def failing(command, **kwargs):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        accel_bench.run_one(args, "cropi", 1, runner=failing)
    assert not (tmp_path / "seed1" / "cropi" / "bench.done").exists()
