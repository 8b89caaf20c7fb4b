"""The bench's latency breakdown (benchmarks/throughput.py: stage_times, loop_lag) on hand-made records."""

from typing import NamedTuple

import orjson

from benchmarks.throughput import Latency, loop_lag, stage_times


class Rec(NamedTuple):
    value: bytes
    timestamp: int
    partition: int = 0


def test_each_stage_is_done_when_its_last_source_has_passed_the_window():
    end = 10_000
    aggregates = [
        Rec(orjson.dumps({"stream": "audio", "source": 0, "closed_until": 0}), 100),  # before the window closed: not it
        Rec(orjson.dumps({"stream": "audio", "source": 0, "closed_until": end}), 200),
        Rec(orjson.dumps({"stream": "audio", "source": 1, "closed_until": end + 10_000}), 300),  # the last to close it
        Rec(orjson.dumps({"stream": "audio", "source": 1, "closed_until": end + 20_000}), 900),  # later ones do not count
        Rec(orjson.dumps({"stream": "fraud", "source": 0, "closed_until": end}), 950),  # the fraud rows are not stage 1's windows
    ]
    anomalies = [
        Rec(orjson.dumps({"kind": "cdn_degradation", "event_time": end - 10_000}), 350, 1),  # another window
        Rec(orjson.dumps({"kind": "cdn_degradation", "event_time": end}), 400, 1),
        Rec(orjson.dumps({"tick": "audio", "source": 0, "event_time": end}), 450, 1),
        Rec(orjson.dumps({"tick": "system", "source": 0, "event_time": end}), 480, 0),  # another anomalies partition
        Rec(orjson.dumps({"tick": "system", "source": 0, "event_time": end}), 500, 1),
        Rec(orjson.dumps({"tick": "system", "source": 0, "event_time": end + 10_000}), 700, 1),
        Rec(orjson.dumps({"tick": "fraud", "source": 0, "event_time": end}), 560, 1),  # moves the fraud scope only
    ]
    got = stage_times({"aggregates": aggregates, "anomalies": anomalies}, {"kind": "cdn_degradation", "event_time": end}, 600)
    assert got == {"stage 1": 300, "stage 2": 400, "clock": 500, "alert": 600}
    fraud = [*anomalies, Rec(orjson.dumps({"kind": "streaming_fraud", "event_time": end}), 410, 1)]
    got = stage_times({"aggregates": aggregates, "anomalies": fraud}, {"kind": "streaming_fraud", "event_time": end}, 600)
    assert got["clock"] == 560  # a fraud alert waits for the fraud stage's tick too


def test_a_stage_whose_records_are_missing_is_left_out():
    got = stage_times({"aggregates": [], "anomalies": []}, {"kind": "x", "event_time": 0}, 5)
    assert got == {"alert": 5}


def test_the_loop_lag_is_what_the_worker_observed_between_the_two_scrapes():
    name = "soundcheck_event_loop_lag_seconds"

    def scraped(le_001: float, le_01: float, le_1: float, total: float, lag_sum: float) -> dict:
        return {f'{name}_bucket{{le="0.001"}}': le_001, f'{name}_bucket{{le="0.01"}}': le_01,
                f'{name}_bucket{{le="0.1"}}': le_1, f'{name}_bucket{{le="+Inf"}}': total,
                f"{name}_count": total, f"{name}_sum": lag_sum}

    # before sending: 1,000 timers on time (start-up, not counted); while sending: 100 more, 98 of
    # them at most 10 ms late and 2 between 10 and 100 ms, 0.5 s of stalls over 10 s
    before, after = scraped(1000, 1000, 1000, 1000, 0.2), scraped(1000, 1098, 1100, 1100, 0.7)
    lat = Latency()
    loop_lag(lat, before, after, seconds=10.0)
    assert 1.0 < lat.loop_lag_p50_ms < 10.0  # in the 1-10 ms bucket (the first 1,000 are left out)
    assert 10.0 < lat.loop_lag_p99_ms <= 100.0
    assert abs(lat.loop_lag_share - 0.05) < 1e-9
    empty = Latency()
    loop_lag(empty, {}, {}, seconds=10.0)  # a worker that did not answer: no figure, no error
    assert empty.loop_lag_p99_ms != empty.loop_lag_p99_ms and empty.loop_lag_share != empty.loop_lag_share  # NaN
