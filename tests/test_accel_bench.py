"""bench/accel_bench.py: the intervals by hand, a finished (demo, method, seed) run is never rerun,
runs wait for their demo's build and their rollouts, and a tiny experiment end to end (run_cropi.sh
replaced by a stand-in that writes what a run leaves)."""

import json
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


def test_hierarchical_interval_by_hand():
    interval = accel_bench.hierarchical_interval
    assert interval([[3.0, 3.0], [3.0, 3.0, 3.0]]) == (3.0, 3.0)
    # one demo: the seeds alone, as above (X/5, X ~ Binomial(5, 0.2))
    assert interval([[0.0, 0.0, 0.0, 0.0, 1.0]]) == (0.0, pytest.approx(0.6))
    # no spread within a demo: the demos alone; five demos, one of them at 1: the same
    assert interval([[0.0] * 5] * 4 + [[1.0] * 5]) == (0.0, pytest.approx(0.6))
    # seed noise inside the demos widens the interval of the demo means [1, 2, 3]
    demo_means = accel_bench.bootstrap_interval([1.0, 2.0, 3.0])
    with_seeds = interval([[0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    assert with_seeds[0] < demo_means[0] and with_seeds[1] > demo_means[1]


def test_a_finished_run_is_not_rerun_and_an_unfinished_one_is(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")
    finished = tmp_path / "demo3" / "seed0" / "cropi"
    (finished / "rollouts").mkdir(parents=True)
    (finished / "rollouts" / "train.done").write_text("12\nkey\n")
    (finished / "bench.done").write_text("100.0\n")
    calls = []

    def runner(command, **kwargs):
        env = kwargs["env"]
        calls.append((command, *(env[k] for k in ("METHOD", "SEED", "DEMO_SEED", "PIN_ISA"))))
        assert env["DEMO_DIR"] == str(tmp_path / "demo3" / "demo") and env["COMPARE"] == ""

    assert accel_bench.run_one(args, 3, "cropi", 0, runner=runner) == finished
    assert calls == []  # finished: not run again
    out = accel_bench.run_one(args, 3, "full", 0, runner=runner)
    assert calls == [(["bash", "run_cropi.sh"], "full", "0", "3", "1")]
    assert (out / "bench.done").exists()
    assert (out / "rollouts" / "train.done").read_text() == "12\nkey\n"  # shared by the cell
    accel_bench.run_one(args, 3, "full", 0, runner=runner)
    assert len(calls) == 1  # now finished too


def test_a_failed_run_leaves_no_marker(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full")

    def failing(command, **kwargs):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        accel_bench.run_one(args, 0, "cropi", 1, runner=failing)
    assert not (tmp_path / "demo0" / "seed1" / "cropi" / "bench.done").exists()


def fake_run_cropi(events: list, lock: threading.Lock, curves=None, fail_demo=None):
    """A stand-in for run_cropi.sh: builds the demo if it is missing (and complains if another
    run is building it), collects the offline rollouts (a marker) if they are missing, and for
    `curves` {(method, demo): targeted accuracy per evaluated step} writes the metrics and step
    markers a run leaves."""
    building = set()

    def runner(command, **kwargs):
        env = kwargs["env"]
        method, demo, out = env["METHOD"], env["DEMO_SEED"], Path(env["OUT_DIR"])
        demo_dir = Path(env["DEMO_DIR"])
        with lock:
            events.append(("start", method, demo, env["SEED"]))
            assert demo not in building, f"demo {demo} built twice at once"
        if not (demo_dir / "demo.done").exists():
            with lock:
                building.add(demo)
            time.sleep(0.2)
            if demo == fail_demo:
                raise RuntimeError(f"demo {demo} failed to build")
            demo_dir.mkdir(parents=True)
            meta = {"sha256": {"model/model.safetensors": f"{demo}" * 64}}
            (demo_dir / "demo.json").write_text(json.dumps(meta | {"cpu_capability": "AVX2"}))
            (demo_dir / "demo.done").write_text("150\nkey\n")
            with lock:
                building.discard(demo)
        if not (out / "rollouts").exists():  # the offline rollouts of this demo and seed
            (out / "rollouts").mkdir(parents=True)
            (out / "rollouts" / "train.done").write_text(f"2\ndemo {demo} seed {env['SEED']}\n")
            time.sleep(0.1)
        if curves:
            targeted = curves[(method, int(demo))]
            rows = [
                {"step": step}
                | {f"eval/{name}/accuracy": a for name in ("test_rot", "test_swap")}
                | {"eval/test_rev/accuracy": 0.5}
                for step, a in enumerate(targeted)
            ]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            checkpoint = out / "stage_0" / "checkpoint"
            checkpoint.mkdir(parents=True)
            (checkpoint / "grpo_train.json").write_text(json.dumps({"cpu_capability": "AVX2"}))
            (out / "stage_0" / "train.done").write_text("10\nkey\n")
        with lock:
            events.append(("end", method, demo, env["SEED"]))

    return runner


def test_runs_wait_for_their_demo_and_their_rollouts(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full,learnability", jobs=2)
    events, lock = [], threading.Lock()
    methods, demos, seeds = ["cropi", "full", "learnability"], [0, 1], [0, 1]
    runner = fake_run_cropi(events, lock)
    finished = list(accel_bench.run_all(args, methods, demos, seeds, runner=runner))
    assert sorted(run[:3] for run in finished) == sorted(
        (m, d, s) for m in methods for d in demos for s in seeds
    )
    # the two demos are built at once, each by its first run
    assert {e for e in events[:2]} == {("start", "cropi", "0", "0"), ("start", "cropi", "1", "0")}
    for demo in ("0", "1"):
        built = events.index(("end", "cropi", demo, "0"))
        others = [e for e in events if e[2] == demo and e[1:] != ("cropi", demo, "0")]
        assert others and all(events.index(e) > built for e in others)
        for seed in ("0", "1"):  # learnability copies the rollouts of its demo and seed's cropi
            assert events.index(("end", "cropi", demo, seed)) < events.index(
                ("start", "learnability", demo, seed)
            )
            copied = tmp_path / f"demo{demo}" / f"seed{seed}" / "learnability" / "rollouts"
            assert (copied / "train.done").read_text() == f"2\ndemo {demo} seed {seed}\n"


def test_a_demo_that_failed_to_build_stops_its_runs_only(tmp_path):
    args = accel_bench.Args(out=str(tmp_path), methods="cropi,full", jobs=2)
    events, lock = [], threading.Lock()
    runner = fake_run_cropi(events, lock, fail_demo="1")
    with pytest.raises(RuntimeError, match="demo 1"):
        list(accel_bench.run_all(args, ["cropi", "full"], [0, 1], [0, 1], runner=runner))
    started = {e[1:] for e in events if e[0] == "start"}
    assert started == {("cropi", "0", "0"), ("cropi", "1", "0"), ("cropi", "0", "1")} | {
        ("full", "0", "0"),
        ("full", "0", "1"),
    }  # demo 1's other runs never start: they would build it again, two at once


def test_a_tiny_experiment_end_to_end(tmp_path, capsys):
    """Two demos x two seeds, one stage of 4 steps evaluated at every step. Full data reaches its
    final targeted accuracy 0.5 at step 4; cropi at step 2 on demo 0 and step 1 on demo 1: step
    speed-ups 2 and 4, the same for both seeds. Mean 3; over demo models the mean of two drawn
    demos is 2, 3 or 4 (p = 1/4, 1/2, 1/4): the interval is [2, 4]. In seconds (training 10 s,
    cropi's offline rollouts 2 s): full 10 s, cropi 2 + 10 * 2/4 = 7 s on demo 0 (10/7 = 1.429)
    and 2 + 10/4 = 4.5 s on demo 1 (2.222)."""
    curves = {
        ("full", 0): [0.1, 0.2, 0.3, 0.4, 0.5],
        ("full", 1): [0.1, 0.2, 0.3, 0.4, 0.5],
        ("cropi", 0): [0.1, 0.3, 0.5, 0.5, 0.6],
        ("cropi", 1): [0.1, 0.5, 0.5, 0.6, 0.6],
    }
    args = accel_bench.Args(
        demos="0,1",
        seeds="0,1",
        stages=1,
        steps_per_stage=4,
        eval_every=1,
        resamples=2000,
        out=str(tmp_path / "runs"),
        results=str(tmp_path / "results"),
    )
    accel_bench.main(args, runner=fake_run_cropi([], threading.Lock(), curves=curves))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("speedup=3.000 speedup_ci=[2.000,4.000] wall_speedup=")
    assert last.endswith("speedup_median=3.00")
    table = (tmp_path / "results" / "accel_demos.md").read_text()
    assert "| 0 | cropi | 2.000 [2.000, 2.000] | 1.429 [1.429, 1.429] |" in table  # per demo
    assert "| 1 | cropi | 4.000 [4.000, 4.000] | 2.222 [2.222, 2.222] |" in table
    assert "| full | 1.00 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in table
    assert "| cropi | 3.00 | 3.000 [2.000, 4.000] |" in table  # over demo models
    assert "0: 0000000000000000..., 1: 1111111111111111..." in table
    assert "stages: ['AVX2']" in table
    assert (tmp_path / "results" / "accel_demos.png").stat().st_size > 0
