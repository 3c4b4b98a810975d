"""What the extension sends, and what it refuses before sending anything (no faultd needed)."""

import pytest
from chaoslib.exceptions import ActivityFailed

from chaosfaultd import actions, client
from chaosfaultd.client import pb


def test_ports_accept_numbers_lists_and_ranges():
    ranges = client.parse_ports(["6379", 5432, "1000-2000,3000"])
    assert [(r.first, r.HasField("last") and r.last) for r in ranges] == [
        (6379, False),
        (5432, False),
        (1000, 2000),
        (3000, False),
    ]


@pytest.mark.parametrize("bad", [None, [], "0", "70000", "2000-1000", "redis", True])
def test_bad_ports_name_the_field(bad):
    with pytest.raises(ValueError, match="ports"):
        client.parse_ports(bad)


@pytest.mark.parametrize(
    "text,seconds", [("500ms", 0.5), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), ("7", 7.0)]
)
def test_durations(text, seconds):
    assert client.parse_seconds(text, "latency") == seconds


@pytest.mark.parametrize("text,amount", [("256KiB/s", 262144), ("1MB", 1000000), (4096, 4096), ("10 B/s", 10)])
def test_sizes(text, amount):
    assert client.parse_bytes(text, "rate") == amount


def test_delay_request_is_the_proto_faultd_reads():
    fault = client.build_fault(
        "delay",
        client.build_target(cgroup="/app", ports=6379, direction="egress", peers="127.0.0.1/32"),
        latency="500ms",
        jitter="100ms",
        labels={"experiment": "x"},
    )
    assert fault.WhichOneof("action") == "delay"
    assert fault.delay.latency.nanos == 500_000_000
    assert fault.delay.jitter.nanos == 100_000_000
    assert fault.delay.mechanism == pb.MECHANISM_UNSPECIFIED
    assert fault.target.WhichOneof("scope") == "cgroup"
    assert fault.target.direction == pb.EGRESS
    assert list(fault.target.peers) == ["127.0.0.1/32"]
    assert dict(fault.labels) == {"experiment": "x"}


def test_stall_request_is_the_proto_faultd_reads():
    target = client.build_target(cgroup="/app", ports=6379)
    plain = client.build_fault("stall", target)
    assert plain.WhichOneof("action") == "stall"
    assert not plain.stall.HasField("close_after")
    closing = client.build_fault("stall", target, close_after="2.5s")
    assert (closing.stall.close_after.seconds, closing.stall.close_after.nanos) == (2, 500_000_000)


def test_slow_handshake_requests_are_the_proto_faultd_reads():
    target = client.build_target(cgroup="/app", ports=6379)
    connect = client.build_fault("slow_connect", target, latency="300ms")
    assert connect.WhichOneof("action") == "slow_connect"
    assert connect.slow_connect.latency.nanos == 300_000_000
    close = client.build_fault("slow_close", target, latency=1)
    assert close.WhichOneof("action") == "slow_close"
    assert close.slow_close.latency.seconds == 1


def test_tamper_requests_are_the_proto_faultd_reads():
    target = client.build_target(cgroup="/app", ports=9000, protocol="udp")
    assert client.build_fault("duplicate", target).duplicate.percent == 100.0
    assert client.build_fault("corrupt", target, percent=5).corrupt.percent == 5.0
    reorder = client.build_fault("reorder", target, percent=25, gap="20ms")
    assert (reorder.reorder.percent, reorder.reorder.gap.nanos) == (25.0, 20_000_000)
    assert reorder.reorder.mechanism == pb.MECHANISM_UNSPECIFIED
    forced = client.build_fault("corrupt", target, percent=5, mechanism="netem")
    assert forced.corrupt.mechanism == pb.NETEM
    tcp = client.build_target(cgroup="/app", ports=6379)
    assert client.build_fault("slice", tcp, max_bytes=16).slice.max_bytes == 16
    paced = client.build_fault("slice", tcp, max_bytes=16, delay="1ms")
    assert paced.slice.delay.nanos == 1_000_000


def test_every_scope():
    assert client.build_target(pid=42, ports=1).pid.pid == 42
    assert client.build_target(pod="uid-1", ports=1).pod.uid == "uid-1"
    assert client.build_target(container="abc", ports=1).container.id == "abc"
    netns = client.build_target(netns="/run/netns/x", interface="veth0", ports=1).netns
    assert (netns.path, netns.interface) == ("/run/netns/x", "veth0")
    assert client.build_target(host=True, ports=1).WhichOneof("scope") == "host"


@pytest.mark.parametrize(
    "arguments,field",
    [
        ({"action": "explode", "cgroup": "/a", "ports": 1}, "action"),
        ({"action": "drop", "ports": 1}, "target"),
        ({"action": "drop", "cgroup": "/a", "pid": 3, "ports": 1}, "target"),
        ({"action": "drop", "cgroup": "/a"}, "ports"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "percent": 150}, "percent"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "latency": "1s"}, "latency"),
        ({"action": "delay", "cgroup": "/a", "ports": 1}, "latency"),
        ({"action": "delay", "cgroup": "/a", "ports": 1, "latency": "soon"}, "latency"),
        ({"action": "delay", "cgroup": "/a", "ports": 1, "latency": "1s", "mechanism": "magic"}, "mechanism"),
        ({"action": "bandwidth", "cgroup": "/a", "ports": 1}, "rate"),
        ({"action": "reset", "cgroup": "/a", "ports": 1, "after_bytes": 0}, "after_bytes"),
        ({"action": "stall", "cgroup": "/a", "ports": 1, "close_after": "0s"}, "close_after"),
        ({"action": "stall", "cgroup": "/a", "ports": 1, "after_bytes": 10}, "after_bytes"),
        ({"action": "slow_connect", "cgroup": "/a", "ports": 1}, "latency"),
        ({"action": "duplicate", "cgroup": "/a", "ports": 1, "percent": 101}, "percent"),
        ({"action": "slice", "cgroup": "/a", "ports": 1}, "max_bytes"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "delay": "1ms"}, "delay"),
        ({"action": "slice", "cgroup": "/a", "ports": 1, "max_bytes": 0}, "max_bytes"),
        ({"action": "corrupt", "cgroup": "/a", "ports": 1, "gap": "5ms"}, "gap"),
        ({"action": "slow_close", "cgroup": "/a", "ports": 1, "latency": "0s"}, "latency"),
        ({"action": "slow_connect", "cgroup": "/a", "ports": 1, "latency": "1s", "jitter": "1ms"}, "jitter"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "direction": "sideways"}, "direction"),
        ({"action": "drop", "netns": "/run/netns/x", "ports": 1}, "netns"),
        ({"action": "drop", "cgroup": "/a", "interface": "eth0", "ports": 1}, "interface"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "ttl": "5s", "duration": "5s"}, "ttl, duration"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "duration": "0s"}, "duration"),
        ({"action": "drop", "cgroup": "/a", "ports": 1, "ttl": "-1"}, "ttl"),
    ],
)
def test_bad_arguments_fail_before_anything_is_sent(arguments, field, monkeypatch):
    def no_connection(*_args, **_kwargs):
        raise AssertionError("connected to faultd for a request that is invalid")

    monkeypatch.setattr(client, "connect", no_connection)
    with pytest.raises(ActivityFailed, match=field):
        actions.inject_fault(**arguments)


def test_address_forms():
    with pytest.raises(client.FaultdError, match="neither unix"):
        client._open_channel("http://x", None, None, None, None)
    with pytest.raises(client.FaultdError, match="mutual TLS"):
        client._open_channel("tcp://127.0.0.1:1", None, None, None, None)
    with pytest.raises(client.FaultdError, match="unix socket needs none"):
        client._open_channel("unix:///run/faultd/faultd.sock", "/ca.pem", None, None, None)


def test_discovery_lists_the_activities():
    import chaosfaultd

    names = {a["name"] for a in chaosfaultd.discover(discover_system=False)["activities"]}
    assert {"inject_fault", "remove_fault", "abort_all", "list_faults", "fault_counters", "capabilities"} <= names
    assert "remove_injected_faults" in names


def test_request_matches_and_lose_reply():
    target = client.build_target(cgroup="/app", ports=5432, pg_statements="COMMIT,insert")
    fault = client.build_fault("lose_reply", target)
    assert fault.WhichOneof("action") == "lose_reply"
    assert list(fault.target.request.postgres.statements) == ["COMMIT", "insert"]
    redis = client.build_target(cgroup="/app", ports=6379, redis_commands=["SET"], redis_key_prefix="u:")
    assert list(redis.request.redis.commands) == ["SET"]
    assert redis.request.redis.key_prefix == "u:"
    assert not client.build_target(cgroup="/app", ports=1).HasField("request")
    with pytest.raises(ValueError, match="pg_statements"):
        client.build_target(cgroup="/app", ports=1, redis_commands="GET", pg_statements="COMMIT")
    with pytest.raises(ValueError, match="redis_key_prefix"):
        client.build_target(cgroup="/app", ports=1, redis_key_prefix="u:")
    with pytest.raises(ValueError, match="percent"):
        client.build_fault("lose_reply", target, percent=50)
