"""Chaos Toolkit rollbacks: take back what the experiment injected."""

from typing import Any, Dict, List

from chaoslib.types import Configuration, Secrets

from chaosfaultd import actions, client

__all__ = ["remove_injected_faults", "release_leases"]


def remove_injected_faults(
    configuration: Configuration = None, secrets: Secrets = None
) -> List[Dict[str, Any]]:
    """Remove every fault this experiment injected that is still in force."""
    return actions.remove_injected_faults(configuration=configuration, secrets=secrets)


def release_leases(configuration: Configuration = None, secrets: Secrets = None) -> None:
    """Revoke the experiment's leases now: whatever is still under them reverts at once.
    (The extension also does this when ``chaos run`` exits.)"""
    client.release_all()
