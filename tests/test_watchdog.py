"""agents.watchdog: which Faust partitions have a commit stuck behind records never acknowledged."""

from types import SimpleNamespace

from agents.watchdog import holes


def consumer(committed, acked):
    return SimpleNamespace(_committed_offset=committed, _acked=acked)


def test_a_commit_behind_records_never_acknowledged_is_a_hole():
    c = consumer({"a0": 92, "a1": 618, "a2": 10, "a3": None}, {"a0": [114, 115, 181], "a1": [], "a2": [11, 12], "a3": [5]})
    assert holes(c) == {"a0": (92, 114)}  # a1: nothing waiting; a2: the next offsets; a3: never committed


def test_no_hole_once_the_missing_records_are_acknowledged():
    assert holes(consumer({"a0": 92}, {"a0": [93, 94, 95]})) == {}
