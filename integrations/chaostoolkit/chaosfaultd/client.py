"""Talking to faultd: the gRPC channel, the experiment's leases, and request building.

Configuration keys (the experiment's ``configuration`` block; environment variables of the
same name in upper case are used when a key is absent):

- ``faultd_address``: ``unix:///run/faultd/faultd.sock`` (default) or ``tcp://HOST:PORT``
  (faultd's ``--listen``, mutual TLS).
- ``faultd_tls_ca``, ``faultd_tls_cert``, ``faultd_tls_key``: PEM files for ``tcp://``
  (may also be given as secrets of the same names); ``faultd_tls_server_name`` to check the
  server certificate against another name than the host.
- ``faultd_lease_ttl``: how long faults outlive an experiment that stops renewing them
  (default 10 s); the experiment renews its lease with a background KeepAlive while it runs.
"""

import atexit
import logging
import os
import re
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import grpc
from google.protobuf import duration_pb2
from google.protobuf.json_format import MessageToDict

from chaosfaultd._generated.faultd.v1 import faultd_pb2 as pb
from chaosfaultd._generated.faultd.v1 import faultd_pb2_grpc as pb_grpc

logger = logging.getLogger("chaostoolkit")

DEFAULT_ADDRESS = "unix:///run/faultd/faultd.sock"
DEFAULT_LEASE_TTL = 10.0
# How long one call may take before it is reported as failed.
CALL_TIMEOUT = 15.0


class FaultdError(Exception):
    """A request faultd refused or could not be reached for; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Values


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_seconds(value: Union[int, float, str], field: str) -> float:
    """Seconds from a number or a string such as ``500ms``, ``1.5s``, ``2m``, ``1h``."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a duration such as 500ms, 30s or 2m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(
                f"{field}: expected a duration such as 500ms, 30s or 2m, got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"{field}: must not be negative, got {value!r}")
    return seconds


def to_duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*(/s)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_bytes(value: Union[int, str], field: str) -> int:
    """Bytes from an integer or a string such as ``256KiB/s``, ``1MB``."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a size such as 256KiB/s, got {value!r}")
    if isinstance(value, int):
        amount = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{field}: expected a size such as 256KiB/s or 1MB, got {value!r}")
        unit = (match.group(2) or "B").lower()
        amount = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if amount <= 0:
        raise ValueError(f"{field}: must be more than 0, got {value!r}")
    return amount


def parse_ports(value: Union[int, str, Iterable[Union[int, str]], None]) -> List[pb.PortRange]:
    """Ports from ``6379``, ``"6379,5432"``, ``"1000-2000"`` or a list of those."""
    if value is None or value == [] or value == "":
        raise ValueError(
            "ports: name at least one port or range (e.g. 6379 or \"1000-2000\"); "
            "faultd refuses a fault on every port"
        )
    items: List[Union[int, str]] = []
    if isinstance(value, (int, str)):
        items = [value]
    else:
        items = list(value)
    ranges = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"ports: {item!r} is not a port")
        parts = [item] if isinstance(item, int) else str(item).split(",")
        for part in parts:
            text = str(part).strip()
            first, _, last = text.partition("-")
            try:
                lo = int(first)
                hi = int(last) if last else None
            except ValueError:
                raise ValueError(f"ports: {text!r} is not a port or a range FIRST-LAST") from None
            for port in (lo, hi):
                if port is not None and not 1 <= port <= 65535:
                    raise ValueError(f"ports: {port} is outside 1-65535")
            if hi is not None and hi < lo:
                raise ValueError(f"ports: range {text!r} ends before it starts")
            ranges.append(pb.PortRange(first=lo, last=hi) if hi is not None else pb.PortRange(first=lo))
    return ranges


def _as_list(value: Union[str, Iterable[str], None]) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(item) for item in value]


_PROTOCOLS = {"both": pb.PROTOCOL_UNSPECIFIED, "tcp": pb.TCP, "udp": pb.UDP}
_DIRECTIONS = {"both": pb.BOTH, "egress": pb.EGRESS, "ingress": pb.INGRESS}
_MECHANISMS = {
    "auto": pb.MECHANISM_UNSPECIFIED,
    "netem": pb.NETEM,
    "edt": pb.EDT,
    "nfqueue": pb.NFQUEUE,
}
ACTIONS = (
    "drop",
    "delay",
    "bandwidth",
    "reject",
    "reset",
    "lose_reply",
    "stall",
    "slow_connect",
    "slow_close",
    "duplicate",
    "corrupt",
    "reorder",
    "slice",
)


def _choice(value: str, table: Dict[str, int], field: str) -> int:
    key = str(value).lower()
    if key not in table:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(table)}")
    return table[key]


def build_target(
    cgroup: Optional[str] = None,
    pid: Optional[int] = None,
    pod: Optional[str] = None,
    container: Optional[str] = None,
    netns: Optional[str] = None,
    interface: Optional[str] = None,
    host: bool = False,
    ports: Any = None,
    protocol: str = "both",
    direction: str = "both",
    peers: Any = None,
    exclude_peers: Any = None,
    redis_commands: Any = None,
    redis_key_prefix: Optional[str] = None,
    pg_statements: Any = None,
) -> pb.Target:
    """The Target message; exactly one scope, and at most one request match (Redis commands,
    with an optional key prefix, or PostgreSQL statements)."""
    scopes = {
        "cgroup": cgroup,
        "pid": pid,
        "pod": pod,
        "container": container,
        "netns": netns,
        "host": host or None,
    }
    given = [name for name, value in scopes.items() if value not in (None, "", False)]
    if len(given) != 1:
        raise ValueError(
            "target: give exactly one of cgroup, pid, pod, container, netns (with interface) "
            f"or host=true; got {', '.join(given) if given else 'none'}"
        )
    if interface and not netns:
        raise ValueError("interface: only with netns (the namespace the interface is in)")
    target = pb.Target(
        ports=parse_ports(ports),
        protocol=_choice(protocol, _PROTOCOLS, "protocol"),
        direction=_choice(direction, _DIRECTIONS, "direction"),
        peers=_as_list(peers),
        exclude_peers=_as_list(exclude_peers),
    )
    commands, statements = _as_list(redis_commands), _as_list(pg_statements)
    if commands and statements:
        raise ValueError("redis_commands, pg_statements: a target matches one protocol's requests")
    if redis_key_prefix and not commands:
        raise ValueError("redis_key_prefix: only with redis_commands")
    if commands:
        target.request.redis.commands.extend(commands)
        target.request.redis.key_prefix = str(redis_key_prefix or "")
    elif statements:
        target.request.postgres.statements.extend(statements)
    scope = given[0]
    if scope == "cgroup":
        target.cgroup.path = str(cgroup)
    elif scope == "pid":
        try:
            target.pid.pid = int(pid)
        except (TypeError, ValueError):
            raise ValueError(f"pid: {pid!r} is not a process id") from None
    elif scope == "pod":
        target.pod.uid = str(pod)
    elif scope == "container":
        target.container.id = str(container)
    elif scope == "netns":
        if not interface:
            raise ValueError("netns: name the interface inside it (interface=...)")
        target.netns.path = str(netns)
        target.netns.interface = str(interface)
    else:
        target.host.SetInParent()
    return target


def build_fault(
    action: str,
    target: pb.Target,
    percent: Optional[float] = None,
    latency: Any = None,
    jitter: Any = None,
    correlation: Optional[float] = None,
    rate: Any = None,
    burst: Any = None,
    mechanism: str = "auto",
    after_bytes: Optional[int] = None,
    labels: Optional[Dict[str, str]] = None,
    close_after: Any = None,
    gap: Any = None,
    max_bytes: Any = None,
    delay: Any = None,
) -> pb.Fault:
    """The Fault message for one of ACTIONS, refusing arguments that belong to another."""
    name = str(action).lower()
    if name not in ACTIONS:
        raise ValueError(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    own = {
        "drop": {"percent"},
        "delay": {"latency", "jitter", "correlation", "mechanism"},
        "bandwidth": {"rate", "burst", "mechanism"},
        "reject": set(),
        "reset": {"after_bytes"},
        "lose_reply": set(),
        "stall": {"close_after"},
        "slow_connect": {"latency"},
        "slow_close": {"latency"},
        "duplicate": {"percent", "mechanism"},
        "corrupt": {"percent", "mechanism"},
        "reorder": {"percent", "gap", "mechanism"},
        "slice": {"max_bytes", "delay"},
    }[name]
    given = {
        "percent": percent,
        "latency": latency,
        "jitter": jitter,
        "correlation": correlation,
        "rate": rate,
        "burst": burst,
        "mechanism": None if mechanism in (None, "auto") else mechanism,
        "after_bytes": after_bytes,
        "close_after": close_after,
        "gap": gap,
        "max_bytes": max_bytes,
        "delay": delay,
    }
    stray = [key for key, value in given.items() if value is not None and key not in own]
    if stray:
        raise ValueError(f"{', '.join(stray)}: not an argument of a {name} fault")
    fault = pb.Fault(target=target, labels={str(k): str(v) for k, v in (labels or {}).items()})
    if name == "drop":
        value = 100.0 if percent is None else float(percent)
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"percent: {percent!r} is not between 0 and 100")
        fault.drop.percent = value
    elif name == "delay":
        if latency is None:
            raise ValueError("latency: a delay fault needs it, e.g. latency=\"500ms\"")
        fault.delay.latency.CopyFrom(to_duration(parse_seconds(latency, "latency")))
        if jitter is not None:
            fault.delay.jitter.CopyFrom(to_duration(parse_seconds(jitter, "jitter")))
        if correlation is not None:
            fault.delay.correlation = float(correlation)
        fault.delay.mechanism = _choice(mechanism or "auto", _MECHANISMS, "mechanism")
    elif name == "bandwidth":
        if rate is None:
            raise ValueError("rate: a bandwidth fault needs it, e.g. rate=\"256KiB/s\"")
        fault.bandwidth.rate_bytes_per_sec = parse_bytes(rate, "rate")
        if burst is not None:
            fault.bandwidth.burst = parse_bytes(burst, "burst")
        fault.bandwidth.mechanism = _choice(mechanism or "auto", _MECHANISMS, "mechanism")
    elif name == "reject":
        fault.reject.SetInParent()
    elif name == "lose_reply":
        fault.lose_reply.SetInParent()
    elif name == "slice":
        if max_bytes is None:
            raise ValueError("max_bytes: a slice fault needs it, e.g. max_bytes=16")
        size = parse_bytes(max_bytes, "max_bytes")
        if not 1 <= size <= 65535:
            raise ValueError(f"max_bytes: {max_bytes!r} is not between 1 and 65535")
        fault.slice.max_bytes = size
        if delay is not None:
            fault.slice.delay.CopyFrom(to_duration(parse_seconds(delay, "delay")))
    elif name in ("duplicate", "corrupt", "reorder"):
        value = 100.0 if percent is None else float(percent)
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"percent: {percent!r} is not between 0 and 100")
        getattr(fault, name).percent = value
        getattr(fault, name).mechanism = _choice(mechanism or "auto", _MECHANISMS, "mechanism")
        if gap is not None:
            fault.reorder.gap.CopyFrom(to_duration(parse_seconds(gap, "gap")))
    elif name in ("slow_connect", "slow_close"):
        if latency is None:
            raise ValueError(f"latency: a {name} fault needs it, e.g. latency=\"300ms\"")
        seconds = parse_seconds(latency, "latency")
        if seconds <= 0:
            raise ValueError(f"latency: must be more than 0, got {latency!r}")
        getattr(fault, name).latency.CopyFrom(to_duration(seconds))
    elif name == "stall":
        fault.stall.SetInParent()
        if close_after is not None:
            seconds = parse_seconds(close_after, "close_after")
            if seconds <= 0:
                raise ValueError(f"close_after: must be more than 0, got {close_after!r}")
            fault.stall.close_after.CopyFrom(to_duration(seconds))
    else:
        fault.reset.SetInParent()
        if after_bytes is not None:
            fault.reset.after_bytes = parse_bytes(after_bytes, "after_bytes")
    return fault


def fault_to_dict(fault: pb.Fault) -> Dict[str, Any]:
    """A fault as the journal shows it (proto field names, the same JSON as grpcurl's)."""
    return MessageToDict(fault, preserving_proto_field_name=True)


# ---------------------------------------------------------------------------------------------
# Connection


def setting(configuration: Optional[Dict], secrets: Optional[Dict], key: str, default=None):
    for source in (configuration or {}, secrets or {}):
        if source.get(key) not in (None, ""):
            return source[key]
    return os.environ.get(key.upper(), default)


class Connection:
    """A channel to one faultd and its two services."""

    def __init__(self, address: str, channel: grpc.Channel):
        self.address = address
        self.channel = channel
        self.faults = pb_grpc.FaultServiceStub(channel)
        self.leases = pb_grpc.LeaseServiceStub(channel)


_lock = threading.RLock()
_connections: Dict[Tuple, Connection] = {}


def connect(configuration: Optional[Dict] = None, secrets: Optional[Dict] = None) -> Connection:
    """The (cached) connection the experiment's configuration names."""
    address = str(setting(configuration, secrets, "faultd_address", DEFAULT_ADDRESS))
    tls = tuple(
        setting(configuration, secrets, key)
        for key in ("faultd_tls_ca", "faultd_tls_cert", "faultd_tls_key", "faultd_tls_server_name")
    )
    key = (address,) + tls
    with _lock:
        if key not in _connections:
            _connections[key] = Connection(address, _open_channel(address, *tls))
        return _connections[key]


def _open_channel(address: str, ca, cert, key, server_name) -> grpc.Channel:
    if address.startswith("unix://"):
        if any((ca, cert, key)):
            raise FaultdError(
                "faultd_tls_*: TLS is for tcp://HOST:PORT; the unix socket needs none"
            )
        # grpc names unix sockets unix:///abs/path, as faultctl's --server does; a default
        # channel works (faultd accepts whatever :authority it sends).
        return grpc.insecure_channel(address)
    if address.startswith("tcp://"):
        hostport = address[len("tcp://") :]
        if not (ca and cert and key):
            raise FaultdError(
                f"faultd_address {address}: faultd's TCP listener uses mutual TLS; set "
                "faultd_tls_ca, faultd_tls_cert and faultd_tls_key (PEM files)"
            )
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca, "faultd_tls_ca"),
                private_key=_read(key, "faultd_tls_key"),
                certificate_chain=_read(cert, "faultd_tls_cert"),
            )
        except OSError as err:
            raise FaultdError(str(err)) from None
        options = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", str(server_name)))
        return grpc.secure_channel(hostport, credentials, options=options)
    raise FaultdError(
        f"faultd_address: {address!r} is neither unix:///PATH nor tcp://HOST:PORT"
    )


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise OSError(f"{key}: cannot read {path}: {err.strerror}") from None


def call(what: str, method, request, timeout: float = CALL_TIMEOUT):
    """One unary call; a gRPC error becomes a FaultdError naming faultd's status and message."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        code = err.code()
        detail = err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            raise FaultdError(
                f"{what}: faultd is not reachable ({detail}); is it running, and does "
                "faultd_address name its socket?"
            ) from None
        raise FaultdError(f"{what}: {code.name}: {detail}") from None


# ---------------------------------------------------------------------------------------------
# The experiment's leases


class LeaseKeeper:
    """A lease granted for this experiment and renewed by a KeepAlive stream in a background
    thread. If the process dies or hangs, renewals stop and faultd reverts the lease's faults
    within one ttl, in the kernel."""

    def __init__(self, connection: Connection, ttl: float, labels: Dict[str, str]):
        self.connection = connection
        self.ttl = ttl
        lease = call(
            "grant lease",
            connection.leases.Grant,
            pb.GrantRequest(ttl=to_duration(ttl), labels=labels),
        )
        self.lease_id = lease.id
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"faultd-keepalive-{lease.id}", daemon=True
        )
        self._thread.start()
        logger.debug(f"faultd: lease {self.lease_id} granted (ttl {ttl}s), kept alive")

    def _requests(self):
        interval = max(self.ttl / 3.0, 0.05)
        while not self._stop.is_set():
            yield pb.KeepAliveRequest(lease_id=self.lease_id)
            self._stop.wait(interval)

    def _keep_alive(self):
        while not self._stop.is_set():
            try:
                for _ in self.connection.leases.KeepAlive(self._requests()):
                    self.renewals += 1
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    logger.warning(
                        f"faultd: lease {self.lease_id} is gone ({err.details()}); "
                        "its faults have reverted"
                    )
                    return
                logger.warning(f"faultd: KeepAlive of lease {self.lease_id} broke: {err.details()}")
                self._stop.wait(min(self.ttl / 4.0, 1.0))

    def alive(self) -> bool:
        """Still renewing (not released, and faultd has not said the lease is gone)."""
        return not self._stop.is_set() and self._thread.is_alive()

    def forget(self) -> None:
        """Stop renewing without revoking (the lease is gone already, e.g. after an Abort)."""
        self._stop.set()

    def release(self) -> None:
        """Stop renewing and revoke the lease: every fault still under it reverts now."""
        self._stop.set()
        try:
            call(
                "revoke lease",
                self.connection.leases.Revoke,
                pb.RevokeRequest(lease_id=self.lease_id),
                timeout=5.0,
            )
        except FaultdError as err:
            if "NOT_FOUND" not in str(err):
                logger.warning(f"faultd: {err}")


_keepers: Dict[Tuple[str, float], LeaseKeeper] = {}
# (address, fault id) of every fault this process injected, for the rollbacks.
_injected: List[Tuple[Connection, str]] = []


def experiment_lease(connection: Connection, ttl: float) -> LeaseKeeper:
    """The kept-alive lease of this experiment for `ttl` (one per faultd and ttl)."""
    with _lock:
        key = (connection.address, ttl)
        keeper = _keepers.get(key)
        if keeper is None or not keeper.alive():
            keeper = LeaseKeeper(connection, ttl, {"owner": "chaostoolkit"})
            _keepers[key] = keeper
        return keeper


def record_injected(connection: Connection, fault_id: str) -> None:
    with _lock:
        _injected.append((connection, fault_id))


def injected_ids(connection: Connection) -> List[str]:
    """Ids of the faults this process injected through `connection`, oldest first."""
    with _lock:
        return [fault_id for conn, fault_id in _injected if conn is connection]


def take_injected() -> List[Tuple[Connection, str]]:
    with _lock:
        taken = list(_injected)
        _injected.clear()
        return taken


def _take_keepers() -> List[LeaseKeeper]:
    with _lock:
        keepers = list(_keepers.values())
        _keepers.clear()
        return keepers


def forget_all() -> None:
    """Stop renewing every lease of this process without revoking them."""
    for keeper in _take_keepers():
        keeper.forget()


def release_all() -> None:
    """Revoke every lease this process holds (at exit: nothing outlives the experiment)."""
    for keeper in _take_keepers():
        keeper.release()


atexit.register(release_all)
