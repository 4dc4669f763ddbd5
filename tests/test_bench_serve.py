"""Fast checks of the serving benchmark's arithmetic (bench/serve.py), no servers: failures leave
throughput and latency, rounds pool, the JSON rows have the issue's keys, the verdict is per level.
The levels here are made up (fakes of measured ones); the benchmark itself runs real servers."""

from __future__ import annotations

import math

from bench import serve as bench

LEVEL_KEYS = {"server", "concurrency", "requests", "failed", "req_per_s", "p50_ms", "p99_ms", "throughput_ratio",
              "p50_ratio"}  # fmt: skip


def _level(concurrency: int, latencies: list[float], failed: int = 0, seconds: float = 10.0) -> bench.Level:
    return bench.Level(concurrency, len(latencies) + failed, failed, seconds, latencies)


def test_failed_requests_count_toward_neither_throughput_nor_latency() -> None:
    level = _level(4, [0.1] * 90 + [5.0] * 10, failed=50, seconds=10.0)
    assert level.requests == 150 and level.requests_per_s == 10.0
    assert level.p50_s == 0.1 and level.p99_s == 5.0
    assert math.isnan(_level(1, [], failed=3).p50_s)


def test_p99_is_the_nearest_rank() -> None:
    latencies = [i / 1000 for i in range(1, 201)]  # 1 ... 200 ms
    assert _level(1, latencies).p99_s == 0.198  # rank ceil(0.99 * 200) = 198
    assert _level(1, [0.3]).p99_s == 0.3


def test_rounds_pool_requests_time_and_latencies() -> None:
    a = bench.Run([40.0], [_level(1, [0.1, 0.2], seconds=1.0)])
    b = bench.Run([50.0], [_level(1, [0.3], failed=1, seconds=2.0)])
    pooled = a.merged(b)
    assert pooled.startup_s == [40.0, 50.0]
    (level,) = pooled.levels
    assert (level.requests, level.failed, level.seconds, level.latencies_s) == (4, 1, 3.0, [0.1, 0.2, 0.3])
    assert level.requests_per_s == 1.0


def test_rows_have_the_documented_keys_and_ratios_against_vllm() -> None:
    results = {
        "kiln": bench.Run([60.0, 64.0], [_level(1, [0.2] * 10, seconds=2.0), _level(16, [0.5] * 40, seconds=2.0)]),
        "vllm": bench.Run([40.0, 40.0], [_level(1, [0.1] * 10, seconds=1.0), _level(16, [0.5] * 40, seconds=2.0)]),
    }
    rows = bench.rows(results)
    levels = [r for r in rows if "concurrency" in r]
    assert len(levels) == 4 and all(set(r) == LEVEL_KEYS for r in levels)
    kiln1 = next(r for r in levels if r["server"] == "kiln" and r["concurrency"] == 1)
    assert kiln1["throughput_ratio"] == 0.5 and kiln1["p50_ratio"] == 2.0
    startup = {r["server"]: r for r in rows if "startup_s" in r}
    assert startup["kiln"]["startup_s"] == 62.0 and startup["kiln"]["startup_ratio"] == 62.0 / 40.0
    assert startup["vllm"]["startup_ratio"] == 1.0
    text = bench.table(rows, 32, 2)
    assert "| kiln | 1 | 10 | 0 | 5.00 | 200.0 | 200.0 | 0.50x | 2.00x |" in text and "kiln: NOT met" in text


def test_the_goal_holds_at_every_level_not_on_average() -> None:
    def results(kiln_rps_at_64: float, failed: int = 0, startup: float = 45.0) -> dict[str, bench.Run]:
        fast = _level(1, [0.1] * 10, seconds=0.5)  # kiln 2x vLLM at concurrency 1 ...
        return {
            "kiln": bench.Run([startup], [fast, _level(64, [1.0] * 64, failed=failed, seconds=64 / kiln_rps_at_64)]),
            "vllm": bench.Run([40.0], [_level(1, [0.1] * 10, seconds=1.0), _level(64, [1.0] * 64, seconds=1.0)]),
        }

    assert bench.verdicts(bench.rows(results(64.0))) == {"kiln": True}
    assert bench.verdicts(bench.rows(results(32.0))) == {"kiln": False}  # ... does not buy 0.5x at 64
    assert bench.verdicts(bench.rows(results(64.0, failed=1))) == {"kiln": False}
    assert bench.verdicts(bench.rows(results(64.0, startup=61.0))) == {"kiln": False}  # 1.525x start-up
