"""The Triton bench's method (`bench/triton_latency.py`): every mode is timed the same way.

No server and no timing here: fake calls, clocks and CPU counters check that every mode runs the
same queries after the same warm-up and an idle wait, that the server's figures leave the warm-up
out, and how two timings of the same calls are compared. Nothing asserts how fast anything is.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.triton_latency import (
    AGREE,
    CONCURRENCY,
    block_plan,
    consistency,
    summarize,
    timed_blocks,
    wait_idle,
)


def test_block_plan_gives_every_mode_every_block_in_rotated_order() -> None:
    plan = block_plan(["a", "b", "c"], 7, 3)
    assert plan == [
        ("a", 0, 3), ("b", 0, 3), ("c", 0, 3),
        ("b", 3, 6), ("c", 3, 6), ("a", 3, 6),
        ("c", 6, 7), ("a", 6, 7), ("b", 6, 7),
    ]  # fmt: skip
    for mode in "abc":
        covered = [i for m, s, e in plan if m == mode for i in range(s, e)]
        assert covered == list(range(7))
    with pytest.raises(ValueError, match="block must be at least 1"):
        block_plan(["a"], 3, 0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_wait_idle_waits_out_a_spinning_worker() -> None:
    clock = FakeClock()
    spin_until = 0.35  # a worker busy on one core until then, idle after

    def cpu() -> float:
        return min(clock.t, spin_until)

    waited, idle = wait_idle(cpu, window_s=0.1, threshold=0.2, clock=clock, sleep=clock.sleep)
    assert idle and waited >= spin_until


def test_wait_idle_gives_up_on_a_busy_machine() -> None:
    clock = FakeClock()
    waited, idle = wait_idle(lambda: clock.t, window_s=0.1, timeout_s=1.0, clock=clock, sleep=clock.sleep)
    assert not idle and waited >= 1.0


def test_timed_blocks_runs_the_same_calls_for_every_mode() -> None:
    log: list[tuple[str, str]] = []
    served = {"count": 0, "ns": 0}
    settles: list[int] = []

    def call(mode: str) -> Any:
        def run(q: str) -> None:
            log.append((mode, q))
            if mode == "server":
                served["count"] += 1
                served["ns"] += 2_000_000  # 2 ms of server time per request

        return run

    def settle(cpu: Any) -> tuple[float, bool]:
        settles.append(len(log))
        return 0.25, True

    queries = [f"q{i}" for i in range(5)]
    raw = timed_blocks(
        {"in_process": call("in_process"), "server": call("server")},
        queries,
        ["w0", "w1"],
        block=2,
        cpu={"in_process": lambda: 0.0, "server": lambda: 0.0},
        idle_cpu=lambda: 0.0,
        server_stats={"server": lambda: (served["count"], served["ns"])},
        settle=settle,
    )
    # each mode: per block, an idle wait, the same warm-up, then the block's queries in order
    for mode in ("in_process", "server"):
        mine = [q for m, q in log if m == mode]
        assert mine == ["w0", "w1", "q0", "q1", "w0", "w1", "q2", "q3", "w0", "w1", "q4"]
        assert len(raw[mode]["times"]) == len(queries)
        assert raw[mode]["waits_s"] == [0.25] * 3 and raw[mode]["idle"]
    assert len(settles) == 6  # 3 blocks x 2 modes, each block after its own wait
    # the server's figures count the timed requests only, not the warm-up
    assert raw["server"]["server"] == (5, 10_000_000)
    lat = summarize(raw)
    assert lat["server"]["server_mean_ms"] == pytest.approx(2.0)
    for key in (
        "p50_ms",
        "p99_ms",
        "mean_ms",
        "n",
        "cpu_ms_per_query",
        "throughput_per_s",
        "server_vs_in_process",
        "p50_vs_in_process",
        "throughput_vs_in_process",
        "cpu_vs_in_process",
    ):
        assert key in lat["server"], key
    assert "server_vs_in_process" not in lat["in_process"]


def _raw(times: list[float], cpu_s: float = 0.01) -> dict[str, Any]:
    return {"times": times, "cpu_s": cpu_s, "waits_s": [0.1], "idle": True}


def test_summarize_ratios_are_against_the_in_process_search() -> None:
    raw = {
        "in_process": _raw([0.002] * 10, cpu_s=0.02),
        "retriever": {**_raw([0.004] * 10, cpu_s=0.03), "server": (10, 30_000_000)},
    }
    lat = summarize(raw)
    r = lat["retriever"]
    assert r["p50_vs_in_process"] == pytest.approx(2.0)
    assert r["throughput_vs_in_process"] == pytest.approx(0.5)
    assert r["server_vs_in_process"] == pytest.approx(1.5)  # 3 ms server mean / 2 ms in-process mean
    assert r["cpu_vs_in_process"] == pytest.approx(1.5)
    assert lat["in_process"]["throughput_per_s"] == pytest.approx(500.0)


def _load_rows(p50_c1: float) -> list[dict[str, float]]:
    return [{"concurrency": c, "p50_ms": p50_c1 * c, "throughput_per_s": 1.0} for c in CONCURRENCY]


def test_consistency_flags_timings_of_the_same_calls_that_disagree() -> None:
    latency = {"in_process": {"p50_ms": 18.8}, "retriever": {"p50_ms": 4.0}}
    load = {"in_process": _load_rows(3.2), "retriever": _load_rows(4.4)}
    stopped = {"in_process": {"p50_ms": 2.0}}
    c = consistency(latency, load, stopped)
    # the committed run's kind of disagreement: the interleaved in-process p50 5.9x its own c=1 run
    assert not c["in_process"]["agree"] and c["in_process"]["ratio"] == pytest.approx(3.2 / 18.8)
    assert c["retriever"]["agree"] and c["retriever"]["load_c1_p50_ms"] == 4.4
    assert not c["in_process_server_stopped"]["agree"]
    fixed = consistency({"in_process": {"p50_ms": 2.1}}, {"in_process": _load_rows(2.3)}, stopped)
    assert fixed["in_process"]["agree"] and fixed["in_process_server_stopped"]["agree"]
    edge = consistency({"m": {"p50_ms": 1.0}}, {"m": _load_rows(AGREE)})
    assert edge["m"]["agree"] and set(edge) == {"m"}
