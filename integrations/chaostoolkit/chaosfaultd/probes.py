"""Chaos Toolkit probes: what faultd holds, how much each fault did, what the node supports."""

from typing import Any, Dict, List, Optional

from chaoslib.exceptions import ActivityFailed
from chaoslib.types import Configuration, Secrets

from chaosfaultd import client
from chaosfaultd.client import FaultdError, pb

__all__ = ["list_faults", "fault_counters", "capabilities"]


def list_faults(
    labels: Optional[Dict[str, str]] = None,
    configuration: Configuration = None,
    secrets: Secrets = None,
) -> List[Dict[str, Any]]:
    """The faults in force, optionally only those carrying every given label."""
    try:
        connection = client.connect(configuration, secrets)
        answer = client.call("list_faults", connection.faults.List, pb.ListFaultsRequest())
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    wanted = {str(k): str(v) for k, v in (labels or {}).items()}
    return [
        client.fault_to_dict(fault)
        for fault in answer.faults
        if all(fault.labels.get(k) == v for k, v in wanted.items())
    ]


def fault_counters(
    fault_id: Optional[str] = None,
    configuration: Configuration = None,
    secrets: Secrets = None,
) -> Dict[str, Any]:
    """Counters of one fault (``matched``, ``dropped``, ``refused``, ``reset``, ``delayed``,
    ``duplicated``, ``corrupted``, ``reordered``, ``sliced``) with its state; without ``fault_id``, those of every fault this experiment injected that
    faultd still knows, keyed by id. A fault that ended (within faultd's --ended-retention,
    15 minutes by default) answers with its final counters, state ``REVERTED`` and
    ``end_reason`` (``EXPIRED``, ``REMOVED``, ...)."""
    try:
        connection = client.connect(configuration, secrets)
        if fault_id:
            ids = [str(fault_id)]
        else:
            ids = client.injected_ids(connection)
        result = {}
        for fid in ids:
            try:
                fault = client.call(
                    "fault_counters", connection.faults.Get, pb.GetFaultRequest(id=fid)
                )
            except FaultdError as err:
                if fault_id or "NOT_FOUND" not in str(err):
                    raise
                continue
            counters = {
                name: getattr(fault.counters, name)
                for name in (
                    "matched",
                    "dropped",
                    "refused",
                    "reset",
                    "delayed",
                    "duplicated",
                    "corrupted",
                    "reordered",
                    "sliced",
                )
            }
            counters["state"] = pb.FaultState.Name(fault.state)
            if fault.HasField("ended_at"):
                counters["end_reason"] = pb.RevertReason.Name(fault.end_reason)
            result[fid] = counters
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    return result[str(fault_id)] if fault_id else result


def capabilities(configuration: Configuration = None, secrets: Secrets = None) -> Dict[str, Any]:
    """What this node's faultd can do: kernel, each action's availability and mechanism."""
    try:
        connection = client.connect(configuration, secrets)
        answer = client.call(
            "capabilities", connection.faults.Capabilities, pb.CapabilitiesRequest()
        )
    except FaultdError as err:
        raise ActivityFailed(str(err)) from None
    return client.fault_to_dict(answer)
