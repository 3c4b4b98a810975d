"""Chaos Toolkit actions: inject and remove faultd faults."""

from typing import Any, Dict, List, Optional, Union

from chaoslib.exceptions import ActivityFailed
from chaoslib.types import Configuration, Secrets

from chaosfaultd import client
from chaosfaultd.client import FaultdError, pb

__all__ = ["inject_fault", "remove_fault", "remove_injected_faults", "abort_all"]


def inject_fault(
    action: str,
    ports: Union[int, str, List[Union[int, str]]] = None,
    cgroup: Optional[str] = None,
    pid: Optional[int] = None,
    pod: Optional[str] = None,
    container: Optional[str] = None,
    netns: Optional[str] = None,
    interface: Optional[str] = None,
    host: bool = False,
    protocol: str = "both",
    direction: str = "both",
    peers: Union[str, List[str], None] = None,
    exclude_peers: Union[str, List[str], None] = None,
    redis_commands: Union[str, List[str], None] = None,
    redis_key_prefix: Optional[str] = None,
    pg_statements: Union[str, List[str], None] = None,
    percent: Optional[float] = None,
    latency: Union[str, float, None] = None,
    jitter: Union[str, float, None] = None,
    correlation: Optional[float] = None,
    rate: Union[str, int, None] = None,
    burst: Union[str, int, None] = None,
    mechanism: str = "auto",
    after_bytes: Union[str, int, None] = None,
    close_after: Union[str, float, None] = None,
    gap: Union[str, float, None] = None,
    max_bytes: Union[str, int, None] = None,
    delay: Union[str, float, None] = None,
    ttl: Union[str, float, None] = None,
    duration: Union[str, float, None] = None,
    labels: Optional[Dict[str, str]] = None,
    dry_run: bool = False,
    configuration: Configuration = None,
    secrets: Secrets = None,
) -> Dict[str, Any]:
    """Inject a fault and return it as faultd answered (its ``id``, ``mechanism``,
    ``resolved`` target, ``expires_at``).

    ``action`` is ``drop`` (``percent``, default 100), ``delay`` (``latency``, ``jitter``,
    ``correlation``, ``mechanism``), ``bandwidth`` (``rate`` such as ``"256KiB/s"``,
    ``burst``, ``mechanism``), ``reject``, ``reset`` (``after_bytes``), ``lose_reply``
    (the matched request runs, its reply is lost and the client's connection torn down),
    ``stall`` (Toxiproxy's ``timeout``: connections stay up, no data flows; ``close_after``
    then resets each one), ``slow_connect`` or ``slow_close`` (``latency``: the SYN, or the
    FIN, is held that long), ``duplicate`` or ``corrupt`` (``percent``, default 100,
    ``mechanism``: netem or nfqueue) or ``reorder`` (``percent``, ``gap``: how long the
    reordered packets are held back, default 10 ms, ``mechanism``), or ``slice``
    (``max_bytes``: TCP data cut into segments of at most that many bytes, ``delay`` apart;
    Toxiproxy's ``slicer``).
    With ``redis_commands`` (``"SET,DEL"`` or a list; ``redis_key_prefix`` optional) or
    ``pg_statements`` (``"COMMIT"``), drop, delay, reset and lose_reply act on those requests
    the workload sends alone (TCP, egress; matched on the start of a segment: not TLS, not a
    request pipelined behind another in one segment, not one split before its name ends).
    The target is exactly one scope -- ``cgroup`` (path under the cgroup v2 root), ``pid``,
    ``pod`` (uid), ``container`` (id), ``netns`` with ``interface``, or ``host=true`` -- and
    ``ports`` (``6379``, ``"6379,5432"``, ``"1000-2000"`` or a list), ``protocol``
    (``both``/``tcp``/``udp``), ``direction`` (``both``/``egress``/``ingress``, seen from the
    workload), ``peers`` and ``exclude_peers`` (IPv4/IPv6 CIDRs).

    Lifetime: by default the fault lives under this experiment's lease, which a background
    KeepAlive renews while ``chaos run`` runs; ``ttl`` (default: configuration
    ``faultd_lease_ttl``, else 10 s) is how soon it reverts by itself if the experiment is
    killed or hangs. With ``duration`` instead, the fault ends by itself after that long
    (a lease of its own that nobody renews; the deadline is enforced in the kernel).
    """
    if ttl is not None and duration is not None:
        raise ActivityFailed(
            "ttl, duration: give one -- ttl for a fault held while the experiment runs, "
            "duration for a fault that ends by itself"
        )
    try:
        target = client.build_target(
            cgroup=cgroup,
            pid=pid,
            pod=pod,
            container=container,
            netns=netns,
            interface=interface,
            host=host,
            ports=ports,
            protocol=protocol,
            direction=direction,
            peers=peers,
            exclude_peers=exclude_peers,
            redis_commands=redis_commands,
            redis_key_prefix=redis_key_prefix,
            pg_statements=pg_statements,
        )
        fault = client.build_fault(
            action,
            target,
            percent=percent,
            latency=latency,
            jitter=jitter,
            correlation=correlation,
            rate=rate,
            burst=burst,
            mechanism=mechanism,
            after_bytes=after_bytes,
            close_after=close_after,
            gap=gap,
            max_bytes=max_bytes,
            delay=delay,
            labels=labels,
        )
        if duration is not None:
            seconds = client.parse_seconds(duration, "duration")
            if seconds <= 0:
                raise ValueError(f"duration: must be more than 0, got {duration!r}")
        else:
            lease_ttl = client.parse_seconds(
                ttl
                if ttl is not None
                else client.setting(configuration, secrets, "faultd_lease_ttl", client.DEFAULT_LEASE_TTL),
                "ttl",
            )
            if lease_ttl <= 0:
                raise ValueError(f"ttl: must be more than 0, got {ttl!r}")
    except ValueError as err:
        raise ActivityFailed(f"inject_fault: {err}") from None

    try:
        connection = client.connect(configuration, secrets)
        request = pb.InjectRequest(fault=fault, dry_run=bool(dry_run))
        if duration is not None:
            request.ttl.CopyFrom(client.to_duration(seconds))
        elif not dry_run:
            request.lease_id = client.experiment_lease(connection, lease_ttl).lease_id
        else:
            request.ttl.CopyFrom(client.to_duration(lease_ttl))
        answer = client.call("inject_fault", connection.faults.Inject, request)
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    if not dry_run:
        client.record_injected(connection, answer.id)
    return client.fault_to_dict(answer)


def remove_fault(
    fault_id: str, configuration: Configuration = None, secrets: Secrets = None
) -> Dict[str, Any]:
    """Remove one fault now (it reverts in the kernel) and return it with its final counters."""
    if not fault_id:
        raise ActivityFailed("remove_fault: fault_id is empty; give the id inject_fault returned")
    try:
        connection = client.connect(configuration, secrets)
        answer = client.call(
            "remove_fault", connection.faults.Remove, pb.RemoveRequest(id=str(fault_id))
        )
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    return client.fault_to_dict(answer)


def remove_injected_faults(
    configuration: Configuration = None, secrets: Secrets = None
) -> List[Dict[str, Any]]:
    """Remove every fault this experiment injected that is still in force; faults that already
    ended (duration over, removed) are skipped. Returns the removed faults."""
    removed = []
    failures = []
    for connection, fault_id in client.take_injected():
        try:
            answer = client.call(
                "remove_fault", connection.faults.Remove, pb.RemoveRequest(id=fault_id)
            )
            removed.append(client.fault_to_dict(answer))
        except FaultdError as err:
            if "NOT_FOUND" in str(err) or "FAILED_PRECONDITION" in str(err):
                continue
            failures.append(f"{fault_id}: {err}")
    if failures:
        raise ActivityFailed("remove_injected_faults: " + "; ".join(failures))
    return removed


def abort_all(configuration: Configuration = None, secrets: Secrets = None) -> Dict[str, Any]:
    """Revert every fault and revoke every lease on this faultd, the experiment's and anyone
    else's (faultctl abort)."""
    try:
        connection = client.connect(configuration, secrets)
        answer = client.call("abort_all", connection.faults.Abort, pb.AbortRequest())
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    client.take_injected()
    client.forget_all()
    return client.fault_to_dict(answer)
