"""The bench's latency breakdown (benchmarks/throughput.py: stage_times) on hand-made records."""

from typing import NamedTuple

import orjson

from benchmarks.throughput import stage_times


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
