"""The admin app (issue 9, /health and /status of issue 4, admin part of issue 8), through Flask's
test client: every endpoint, every auth rule, every error code and the JSON error shape.

Snapshots are built here; writes go to a recording AdminActions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from node.admin import AdminActions, create_app, is_loopback
from node.status import (
    ClientView,
    Counters,
    Event,
    LatencyHistogram,
    RaftView,
    RegistryCounts,
    RoomView,
    ServerView,
    Snapshot,
    SnapshotBox,
)

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SERVERS = (
    ServerView("s1", "127.0.0.1", 4444, 5555, 6444, 7555, 1, True, "member"),
    ServerView("s2", "127.0.0.1", 4445, 5556, 6445, 7556, 2, True, "member"),
    ServerView("s3", "127.0.0.1", 4446, 5557, 6446, 7557, 3, True, "coordinator"),
)


def make_snapshot(**changes: Any) -> Snapshot:
    """This server is s1: two local clients in two local rooms; carol and a room live on s2."""
    base = Snapshot(
        server_id="s1",
        pid=4242,
        role="member",
        coordinator="s3",
        servers=SERVERS,
        servers_up=("s1", "s2", "s3"),
        rooms=(
            RoomView("MainHall-s1", "s1", "", ("bob",)),
            RoomView("jokes", "s1", "alice", ("alice",)),
            RoomView("MainHall-s2", "s2", "", None),
            RoomView("games", "s2", "carol", None),
        ),
        clients=(
            ClientView("alice", "s1", "jokes"),
            ClientView("bob", "s1", "MainHall-s1"),
            ClientView("carol", "s2"),
        ),
        local_client_count=2,
        raft=RaftView(leader="s2", term=4, commit_index=17, applied_index=16, is_leader=False, quorum=True),
        registry_counts=RegistryCounts(identities=3, rooms=4),
        counters=Counters(messages_relayed=10, deliveries=30, approvals=5, refusals=2, elections=1, kicks=0),
        approval_latency=LatencyHistogram.of([0.003, 0.004, 0.02, 1.5]),
        recent_events=(Event(1000.0, "s3 is up"), Event(1001.0, "coordinator is now s3")),
        serving=True,
        taken_at=1002.0,
    )
    return dataclasses.replace(base, **changes)


class RecordingActions:
    """An AdminActions that records calls and answers what the test set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.kick_result = True
        self.delete_result = "ok"
        self.error: Exception | None = None

    def _call(self, *call: str) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error

    def start_election(self) -> None:
        self._call("start_election")

    def kick(self, identity: str) -> bool:
        self._call("kick", identity)
        return self.kick_result

    def delete_room(self, room_id: str) -> str:
        self._call("delete_room", room_id)
        return self.delete_result


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Admin:
    app: Flask
    client: FlaskClient
    box: SnapshotBox
    actions: RecordingActions
    clock: Clock


def build(token: str | None = TOKEN, loopback_reads_only: bool = False, publish: bool = True) -> Admin:
    clock = Clock()
    box = SnapshotBox(clock)
    if publish:
        box.publish(make_snapshot())
    actions = RecordingActions()
    app = create_app(box, actions, token, loopback_reads_only)
    return Admin(app, app.test_client(), box, actions, clock)


@pytest.fixture
def admin() -> Iterator[Admin]:
    yield build()


def assert_json_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "message", "status"}
    assert body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def test_recording_actions_satisfy_the_protocol() -> None:
    actions: AdminActions = RecordingActions()
    assert actions.kick("x") is True


# --- /health ---------------------------------------------------------------------------------------


def test_health_is_503_before_any_snapshot() -> None:
    response = build(publish=False).client.get("/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "starting"}


def test_health_is_503_until_serving(admin: Admin) -> None:
    admin.box.publish(make_snapshot(serving=False))
    assert admin.client.get("/health").status_code == 503


def test_health_is_200_once_serving(admin: Admin) -> None:
    response = admin.client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_health_is_503_when_the_loop_stopped_publishing(admin: Admin) -> None:
    admin.clock.now += 60
    response = admin.client.get("/health")
    assert response.status_code == 503
    assert response.get_json()["status"] == "stale"


# --- reads -----------------------------------------------------------------------------------------


def test_status_has_the_fields_of_issue_4(admin: Admin) -> None:
    body = admin.client.get("/status").get_json()
    assert body["server_id"] == "s1"
    assert body["pid"] == 4242
    assert body["role"] == "member"
    assert body["coordinator"] == "s3"
    assert body["servers_up"] == ["s1", "s2", "s3"]
    assert body["clients"] == 2
    assert body["rooms"] == ["MainHall-s1", "jokes"]
    assert body["raft"] == {
        "leader": "s2",
        "term": 4,
        "commit_index": 17,
        "applied_index": 16,
        "is_leader": False,
        "quorum": True,
    }
    assert body["registry"] == {"identities": 3, "rooms": 4}
    assert body["counters"]["messages_relayed"] == 10


@pytest.mark.parametrize("path", ["/status", "/servers", "/rooms", "/rooms/jokes", "/clients", "/cluster"])
def test_reads_are_503_json_before_any_snapshot(path: str) -> None:
    body = assert_json_error(build(publish=False).client.get(path), 503)
    assert body["error"] == "unavailable"


def test_servers_lists_every_configured_server_as_this_server_sees_it(admin: Admin) -> None:
    down = dataclasses.replace(SERVERS[2], up=False, role="down")
    admin.box.publish(make_snapshot(servers=(*SERVERS[:2], down), coordinator="s2", servers_up=("s1", "s2")))
    servers = admin.client.get("/servers").get_json()["servers"]
    assert [s["server_id"] for s in servers] == ["s1", "s2", "s3"]
    s3 = servers[2]
    assert s3["up"] is False and s3["role"] == "down" and s3["coordinator"] is False
    assert servers[1]["coordinator"] is True and servers[1]["raft_leader"] is True
    assert servers[0] == {
        "server_id": "s1",
        "host": "127.0.0.1",
        "clients_port": 4444,
        "coordination_port": 5555,
        "admin_port": 6444,
        "raft_port": 7555,
        "priority": 1,
        "up": True,
        "role": "member",
        "coordinator": False,
        "raft_leader": False,
        "admin_url": "http://127.0.0.1:6444",
        "ws_port": 0,
        "ws_url": "ws://127.0.0.1:0/",
        "incarnation": None,
        "self": True,
    }


def test_rooms_lists_every_room_with_member_counts_for_local_ones(admin: Admin) -> None:
    rooms = {r["room_id"]: r for r in admin.client.get("/rooms").get_json()["rooms"]}
    assert set(rooms) == {"MainHall-s1", "jokes", "MainHall-s2", "games"}
    assert rooms["jokes"] == {"room_id": "jokes", "server_id": "s1", "owner": "alice", "local": True, "member_count": 1}
    assert rooms["games"] == {"room_id": "games", "server_id": "s2", "owner": "carol", "local": False,
                              "member_count": None}  # fmt: skip


def test_room_details_show_members_of_a_local_room(admin: Admin) -> None:
    body = admin.client.get("/rooms/jokes").get_json()
    assert body["members"] == ["alice"] and body["owner"] == "alice" and body["local"] is True


def test_room_details_of_a_remote_room_have_no_members(admin: Admin) -> None:
    body = admin.client.get("/rooms/games").get_json()
    assert body["server_id"] == "s2" and body["members"] is None and body["local"] is False


def test_unknown_room_is_404(admin: Admin) -> None:
    assert_json_error(admin.client.get("/rooms/nosuchroom"), 404)


def test_clients_lists_identities_cluster_wide_with_rooms_of_local_ones(admin: Admin) -> None:
    clients = {c["identity"]: c for c in admin.client.get("/clients").get_json()["clients"]}
    assert clients["alice"] == {"identity": "alice", "server_id": "s1", "local": True, "room_id": "jokes",
                                "in_transit": False}  # fmt: skip
    assert clients["carol"]["server_id"] == "s2" and clients["carol"]["room_id"] is None
    assert clients["carol"]["local"] is False


def test_cluster_gives_per_server_counts_and_newest_events_first(admin: Admin) -> None:
    body = admin.client.get("/cluster").get_json()
    per_server = {s["server_id"]: (s["clients"], s["rooms"], s["self"]) for s in body["servers"]}
    assert per_server == {"s1": (2, 2, True), "s2": (1, 2, False), "s3": (0, 0, False)}
    assert body["coordinator"] == "s3" and body["raft"]["leader"] == "s2"
    assert [e["text"] for e in body["events"]] == ["coordinator is now s3", "s3 is up"]
    assert body["counters"]["messages_relayed"] == 10


# --- metrics ---------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_is_prometheus_text_built_from_the_snapshot(admin: Admin) -> None:
    down = dataclasses.replace(SERVERS[2], up=False, role="down")
    admin.box.publish(make_snapshot(servers=(*SERVERS[:2], down)))
    response = admin.client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    got = samples(response.get_data(as_text=True))
    assert got[("chatmesh_serving", ())] == 1
    assert got[("chatmesh_clients", ())] == 2
    assert got[("chatmesh_rooms", ())] == 2
    assert got[("chatmesh_registry_identities", ())] == 3
    assert got[("chatmesh_registry_rooms", ())] == 4
    assert got[("chatmesh_coordinator", (("server_id", "s3"),))] == 1
    assert got[("chatmesh_coordinator", (("server_id", "s1"),))] == 0
    assert got[("chatmesh_is_coordinator", ())] == 0
    assert got[("chatmesh_raft_term", ())] == 4
    assert got[("chatmesh_raft_commit_index", ())] == 17
    assert got[("chatmesh_raft_is_leader", ())] == 0
    assert got[("chatmesh_peer_up", (("peer", "s2"),))] == 1
    assert got[("chatmesh_peer_up", (("peer", "s3"),))] == 0
    assert ("chatmesh_peer_up", (("peer", "s1"),)) not in got
    assert got[("chatmesh_messages_relayed_total", ())] == 10
    assert got[("chatmesh_deliveries_total", ())] == 30
    assert got[("chatmesh_approvals_total", ())] == 5
    assert got[("chatmesh_refusals_total", ())] == 2
    assert got[("chatmesh_elections_total", ())] == 1
    assert got[("chatmesh_approval_latency_seconds_count", ())] == 4
    assert got[("chatmesh_approval_latency_seconds_sum", ())] == pytest.approx(1.527)
    assert got[("chatmesh_approval_latency_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[("chatmesh_approval_latency_seconds_bucket", (("le", "0.025"),))] == 3
    assert got[("chatmesh_approval_latency_seconds_bucket", (("le", "+Inf"),))] == 4


def test_metrics_follow_the_latest_snapshot(admin: Admin) -> None:
    admin.client.get("/metrics")
    admin.box.publish(make_snapshot(counters=Counters(messages_relayed=99), coordinator="s1"))
    got = samples(admin.client.get("/metrics").get_data(as_text=True))
    assert got[("chatmesh_messages_relayed_total", ())] == 99
    assert got[("chatmesh_is_coordinator", ())] == 1


def test_metrics_before_any_snapshot_say_not_serving() -> None:
    got = samples(build(publish=False).client.get("/metrics").get_data(as_text=True))
    assert got[("chatmesh_serving", ())] == 0
    assert ("chatmesh_clients", ()) not in got


def test_two_apps_in_one_process_keep_their_own_metrics() -> None:
    one, two = build(), build()
    two.box.publish(make_snapshot(local_client_count=7))
    assert samples(one.client.get("/metrics").get_data(as_text=True))[("chatmesh_clients", ())] == 2
    assert samples(two.client.get("/metrics").get_data(as_text=True))[("chatmesh_clients", ())] == 7


def test_metrics_speak_openmetrics_when_asked(admin: Admin) -> None:
    response = admin.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


# --- writes and auth -------------------------------------------------------------------------------

WRITES = [
    ("post", "/admin/election", None, ("start_election",)),
    ("post", "/admin/kick", {"identity": "alice"}, ("kick", "alice")),
    ("delete", "/rooms/jokes", None, ("delete_room", "jokes")),
]


@pytest.mark.parametrize(("method", "path", "body", "call"), WRITES)
def test_writes_are_refused_with_403_when_no_token_is_configured(method: str, path: str, body: Any,
                                                                 call: tuple[str, ...]) -> None:  # fmt: skip
    for token in (None, "", "   "):
        admin = build(token=token)
        response = getattr(admin.client, method)(path, json=body, headers=AUTH)
        message = assert_json_error(response, 403)["message"]
        assert "no admin token is configured" in message
        assert admin.actions.calls == []


@pytest.mark.parametrize(("method", "path", "body", "call"), WRITES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer tökén"},  # non-ASCII must be a 401, not a TypeError
    ],
    ids=["missing", "wrong", "basic", "no-scheme", "empty", "longer", "non-ascii"],
)
def test_writes_without_the_right_token_are_401(method: str, path: str, body: Any, call: tuple[str, ...],
                                                headers: dict[str, str], admin: Admin) -> None:  # fmt: skip
    response = getattr(admin.client, method)(path, json=body, headers=headers)
    assert_json_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert admin.actions.calls == []


@pytest.mark.parametrize(("method", "path", "body", "call"), WRITES)
def test_writes_with_the_right_token_reach_the_server(method: str, path: str, body: Any, call: tuple[str, ...],
                                                      admin: Admin) -> None:  # fmt: skip
    response = getattr(admin.client, method)(path, json=body, headers=AUTH)
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    assert admin.actions.calls == [call]


def test_the_token_is_checked_before_the_body(admin: Admin) -> None:
    assert_json_error(admin.client.post("/admin/kick", data="not json"), 401)


def test_a_configured_token_is_used_without_surrounding_whitespace() -> None:
    admin = build(token=f"  {TOKEN}\n")
    assert admin.client.post("/admin/election", headers=AUTH).status_code == 202


def test_election_is_202(admin: Admin) -> None:
    response = admin.client.post("/admin/election", headers=AUTH)
    assert response.status_code == 202
    assert response.get_json() == {"result": "election started"}


def test_kick_of_a_local_client(admin: Admin) -> None:
    response = admin.client.post("/admin/kick", json={"identity": "alice"}, headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == {"result": "kicked", "identity": "alice"}


def test_kick_body_is_read_whatever_its_content_type(admin: Admin) -> None:
    response = admin.client.post("/admin/kick", data='{"identity": "alice"}', headers=AUTH,
                                 content_type="application/x-www-form-urlencoded")  # fmt: skip
    assert response.status_code == 200
    assert admin.actions.calls == [("kick", "alice")]


@pytest.mark.parametrize(
    "data",
    ["not json", "[1, 2]", '"alice"', "{}", '{"identity": 5}', '{"identity": ""}', '{"identity": null}', ""],
)
def test_kick_with_a_bad_body_is_400(data: str, admin: Admin) -> None:
    response = admin.client.post("/admin/kick", data=data, content_type="application/json", headers=AUTH)
    assert_json_error(response, 400)
    assert admin.actions.calls == []


def test_kick_of_an_unknown_identity_is_404(admin: Admin) -> None:
    admin.actions.kick_result = False
    assert_json_error(admin.client.post("/admin/kick", json={"identity": "nobody"}, headers=AUTH), 404)


def test_kick_of_a_client_of_another_server_is_409_naming_it(admin: Admin) -> None:
    admin.actions.kick_result = False
    body = assert_json_error(admin.client.post("/admin/kick", json={"identity": "carol"}, headers=AUTH), 409)
    assert "s2" in body["message"]


@pytest.mark.parametrize(
    ("result", "status", "error"),
    [
        ("not-found", 404, "not-found"),
        ("not-local", 409, "not-local"),
        ("mainhall", 409, "mainhall"),
        ("unavailable", 503, "unavailable"),
    ],
)
def test_delete_room_answers(result: str, status: int, error: str, admin: Admin) -> None:
    admin.actions.delete_result = result
    body = assert_json_error(admin.client.delete("/rooms/games", headers=AUTH), status)
    assert body["error"] == error
    if result == "not-local":
        assert "server s2" in body["message"]


def test_delete_room_ok(admin: Admin) -> None:
    response = admin.client.delete("/rooms/jokes", headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == {"result": "deleted", "room_id": "jokes"}


@pytest.mark.parametrize("error", [TimeoutError(), RuntimeError("Event loop is closed")])
def test_a_write_the_loop_cannot_answer_is_503(error: Exception, admin: Admin) -> None:
    admin.actions.error = error
    body = assert_json_error(admin.client.post("/admin/election", headers=AUTH), 503)
    assert body["error"] == "unavailable"


def test_a_bug_is_a_500_json_without_traceback(admin: Admin) -> None:
    admin.actions.error = ValueError("secret internals")
    body = assert_json_error(admin.client.post("/admin/kick", json={"identity": "alice"}, headers=AUTH), 500)
    assert "secret internals" not in body["message"]


# --- generic errors --------------------------------------------------------------------------------


def test_unknown_path_is_404_json(admin: Admin) -> None:
    assert_json_error(admin.client.get("/nope"), 404)


def test_wrong_method_is_405_json_with_allow(admin: Admin) -> None:
    response = admin.client.get("/admin/election")
    assert_json_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_oversized_body_is_413_json(admin: Admin) -> None:
    big = '{"identity": "' + "a" * 100_000 + '"}'
    response = admin.client.post("/admin/kick", data=big, content_type="application/json", headers=AUTH)
    assert_json_error(response, 413)
    assert admin.actions.calls == []


# --- loopback-only reads ---------------------------------------------------------------------------

REMOTE = {"REMOTE_ADDR": "192.0.2.7"}  # TEST-NET-1: a test environ value, no traffic is sent


@pytest.mark.parametrize("path", ["/health", "/status", "/metrics", "/", "/static/dashboard.js", "/nope"])
def test_loopback_only_refuses_reads_from_other_addresses(path: str) -> None:
    admin = build(loopback_reads_only=True)
    assert_json_error(admin.client.get(path, environ_base=REMOTE), 403)


def test_loopback_only_refuses_writes_from_other_addresses_even_with_the_token() -> None:
    admin = build(loopback_reads_only=True)
    assert_json_error(admin.client.post("/admin/election", headers=AUTH, environ_base=REMOTE), 403)
    assert admin.actions.calls == []


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_only_answers_loopback(address: str) -> None:
    admin = build(loopback_reads_only=True)
    assert admin.client.get("/status", environ_base={"REMOTE_ADDR": address}).status_code == 200


def test_loopback_only_ignores_forwarding_headers() -> None:
    admin = build(loopback_reads_only=True)
    headers = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
    assert_json_error(admin.client.get("/status", headers=headers, environ_base=REMOTE), 403)


def test_reads_are_open_by_default(admin: Admin) -> None:
    assert admin.client.get("/status", environ_base=REMOTE).status_code == 200


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.2", True), ("10.0.0.1", False), ("::ffff:10.0.0.1", False),
     ("", False), (None, False), ("not-an-ip", False), ("fe80::1%eth0", False)],
)  # fmt: skip
def test_is_loopback(address: str | None, expected: bool) -> None:
    assert is_loopback(address) is expected


# --- cross-origin reads for the dashboard ----------------------------------------------------------


def test_cluster_dashboards_may_read_cross_origin(admin: Admin) -> None:
    response = admin.client.get("/status", headers={"Origin": "http://127.0.0.1:6446"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:6446"
    response = admin.client.get("/status", headers={"Origin": "http://localhost:6445"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:6445"


def test_other_origins_may_not_read_cross_origin(admin: Admin) -> None:
    response = admin.client.get("/status", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_writes_never_allow_cross_origin(admin: Admin) -> None:
    response = admin.client.post("/admin/election", headers={**AUTH, "Origin": "http://127.0.0.1:6446"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_json_reads_are_not_cached(admin: Admin) -> None:
    assert admin.client.get("/status").headers["Cache-Control"] == "no-store"


# --- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_page_and_its_assets_are_served(admin: Admin) -> None:
    page = admin.client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/static/dashboard.js" in html and "/static/dashboard.css" in html
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "http://127.0.0.1:6446" in csp
    js = admin.client.get("/static/dashboard.js")
    assert js.status_code == 200 and "javascript" in (js.mimetype or "")
    assert "/cluster" in js.get_data(as_text=True)
    js.close()
    css = admin.client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    css.close()
    page.close()
