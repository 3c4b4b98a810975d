"""Chaos Toolkit extension for faultd.

Actions (``chaosfaultd.actions``): ``inject_fault``, ``remove_fault``,
``remove_injected_faults``, ``abort_all``. Probes (``chaosfaultd.probes``): ``list_faults``,
``fault_counters``, ``capabilities``. Rollbacks (``chaosfaultd.rollbacks``):
``remove_injected_faults``, ``release_leases``. See README.md.
"""

from typing import List

from chaoslib.discovery.discover import (
    discover_actions,
    discover_probes,
    initialize_discovery_result,
)
from chaoslib.types import DiscoveredActivities, Discovery

__version__ = "0.1.0"
__all__ = ["__version__", "discover"]


def discover(discover_system: bool = True) -> Discovery:
    """What ``chaos discover chaostoolkit-faultd`` shows: the activities and, when faultd is
    reachable on its default socket, the node's capabilities."""
    discovery = initialize_discovery_result("chaostoolkit-faultd", __version__, "faultd")
    discovery["activities"].extend(load_exported_activities())
    if discover_system:
        from chaosfaultd import probes

        try:
            discovery["system"] = probes.capabilities()
        except Exception as err:  # the node may have no faultd: discovery still lists activities
            discovery["system"] = {"error": str(err)}
    return discovery


def load_exported_activities() -> List[DiscoveredActivities]:
    activities = []
    activities.extend(discover_actions("chaosfaultd.actions"))
    activities.extend(discover_probes("chaosfaultd.probes"))
    activities.extend(discover_actions("chaosfaultd.rollbacks"))
    return activities
