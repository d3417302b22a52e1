"""ClusterTimings (cluster/timings.py): defaults hold, relations are checked with the values named, and
the environment and the command line override in that order."""

from __future__ import annotations

import pytest

from cluster.timings import ClusterTimings


def test_the_defaults_satisfy_every_relation() -> None:
    t = ClusterTimings()
    assert t.stall_threshold_s + 2 * t.heartbeat_interval_s <= t.suspect_after_s
    assert "suspect_after_s=0.75" in t.describe()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"suspect_after_s": 0.15}, "suspect_after_s >= 2 * heartbeat_interval_s"),
        ({"suspect_max_s": 0.5}, "suspect_max_s=0.5"),
        ({"mesh_heartbeat_interval_s": 0.05}, "mesh_heartbeat_interval_s >= heartbeat_interval_s"),
        ({"mesh_heartbeat_interval_s": 2.0}, "suspect_max_s >= 2 * mesh_heartbeat_interval_s"),
        ({"nomination_timeout_s": 0.85}, "nomination_timeout_s=0.85, answer_timeout_s=0.3, max_nominees=2"),
        ({"raft_min_timeout_s": 0.1}, "3 * raft_append_entries_period_s < raft_min_timeout_s"),
        ({"commit_timeout_s": 3.0}, "commit_timeout_s=3.0"),
        ({"request_deadline_s": 3.2, "peer_request_timeout_s": 1.6}, "request_deadline_s > suspect_max_s + answer"),
        ({"stall_threshold_s": 0.7}, "stall_threshold_s=0.7, heartbeat_interval_s=0.1, suspect_after_s=0.75"),
        ({"startup_grace_s": 1.0}, "startup_grace_s >= 2 * suspect_after_s"),
        ({"suspect_max_s": 4.0}, "raft_min_timeout_s > suspect_max_s"),
        ({"holdoff_s": 0.0}, "holdoff_s must be a positive number"),
        ({"raft_release_defer_s": 1.5}, "raft_release_defer_s < commit_timeout_s"),
    ],
)
def test_a_broken_relation_is_refused_naming_the_values(changes: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("*", r"\*").replace("+", r"\+")):
        ClusterTimings(**changes)  # type: ignore[arg-type]


def test_the_environment_then_the_command_line_override() -> None:
    env = {"CHATMESH_TIMING_SUSPECT_AFTER_S": "2.5", "CHATMESH_TIMING_STALL_THRESHOLD_S": "0.6", "OTHER": "x"}
    t = ClusterTimings.from_sources(env, ["suspect_after_s=0.9", "max_nominees=3", "nomination_timeout_s=1.5"])
    assert (t.suspect_after_s, t.stall_threshold_s, t.max_nominees) == (0.9, 0.6, 3)


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"CHATMESH_TIMING_NOPE": "1"}, [], "CHATMESH_TIMING_NOPE: unknown timing"),
        ({"CHATMESH_TIMING_HOLDOFF_S": "soon"}, [], "CHATMESH_TIMING_HOLDOFF_S='soon' is not a number"),
        ({}, ["holdoff_s"], "expected field=value"),
        ({}, ["holdoff_s=nan"], "not a finite number"),
        ({}, ["max_nominees=2.5"], "max_nominees must be a whole number"),
    ],
)
def test_bad_overrides_name_the_variable_or_argument(env: dict[str, str], args: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ClusterTimings.from_sources(env, args)
