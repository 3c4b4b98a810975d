"""Every action and probe against a real faultd (FAULTD_ADDRESS, unix socket or mTLS TCP with
FAULTD_TLS_CA/CERT/KEY) on a cgroup of the caller's (FAULTD_TEST_CGROUP). The project's test
command (tests/tests/chaostoolkit.rs) starts both and runs this file."""

import os
import time

import pytest
from chaoslib.exceptions import ActivityFailed

from chaosfaultd import actions, client, probes, rollbacks


@pytest.fixture
def cgroup():
    for name in ("FAULTD_ADDRESS", "FAULTD_TEST_CGROUP"):
        assert os.environ.get(name), (
            f"{name} is not set: run these tests through `cargo xtask test` "
            "(tests/tests/chaostoolkit.rs starts faultd and a cgroup for them)"
        )
    yield os.environ["FAULTD_TEST_CGROUP"]
    rollbacks.remove_injected_faults()
    rollbacks.release_leases()


def active_ids():
    return {f["id"] for f in probes.list_faults()}


def test_capabilities_name_the_kernel_and_actions(cgroup):
    caps = probes.capabilities()
    assert caps["kernel_release"]
    assert {a["action"] for a in caps["actions"]} >= {"drop", "delay", "reject", "reset"}


def test_inject_list_count_remove(cgroup):
    fault = actions.inject_fault(
        "drop", cgroup=cgroup, ports=[6379], percent=100, labels={"suite": "live"}
    )
    assert fault["state"] == "ACTIVE"
    assert fault["mechanism"]
    assert fault["resolved"]["cgroup_path"] == cgroup
    assert [f["id"] for f in probes.list_faults(labels={"suite": "live"})] == [fault["id"]]
    assert probes.list_faults(labels={"suite": "other"}) == []
    counters = probes.fault_counters(fault["id"])
    assert counters["state"] == "ACTIVE"
    assert counters["dropped"] == 0
    assert fault["id"] in probes.fault_counters()
    removed = actions.remove_fault(fault["id"])
    assert removed["state"] == "REVERTED"
    assert fault["id"] not in active_ids()
    with pytest.raises(ActivityFailed, match="NOT_FOUND"):
        actions.remove_fault(fault["id"])


def test_faultd_refusals_name_the_field_and_change_nothing(cgroup):
    before = active_ids()
    with pytest.raises(ActivityFailed, match="NOT_FOUND|cgroup"):
        actions.inject_fault("drop", cgroup="/no-such-cgroup-of-faultd-tests", ports=6379)
    with pytest.raises(ActivityFailed, match="PERMISSION_DENIED"):
        actions.inject_fault("drop", cgroup=cgroup, ports=22)
    with pytest.raises(ActivityFailed, match="INVALID_ARGUMENT"):
        actions.inject_fault("reject", cgroup=cgroup, ports=6379, protocol="udp")
    assert active_ids() == before


def test_dry_run_changes_nothing(cgroup):
    fault = actions.inject_fault("delay", cgroup=cgroup, ports=6379, latency="100ms", dry_run=True)
    assert fault["state"] == "DRY_RUN"
    assert not fault.get("id")
    assert active_ids() == set()


def test_the_experiment_lease_is_kept_alive_then_revoked(cgroup):
    fault = actions.inject_fault("reject", cgroup=cgroup, ports=6379, ttl="1s")
    # Three ttls later it is still there: the background KeepAlive renews the lease.
    time.sleep(3.0)
    assert fault["id"] in active_ids()
    rollbacks.release_leases()
    assert fault["id"] not in active_ids()


def test_a_duration_ends_the_fault_by_itself(cgroup):
    fault = actions.inject_fault("reset", cgroup=cgroup, ports=5432, duration="1s")
    assert fault["id"] in active_ids()
    deadline = time.monotonic() + 1.5
    while fault["id"] in active_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fault["id"] not in active_ids()
    # What it did stays readable after it ended.
    counters = probes.fault_counters(fault["id"])
    assert counters["state"] == "REVERTED"
    assert counters["end_reason"] == "EXPIRED"


def test_rollback_removes_what_the_experiment_injected_and_abort_everything(cgroup):
    first = actions.inject_fault("drop", cgroup=cgroup, ports=6379)
    second = actions.inject_fault("bandwidth", cgroup=cgroup, ports=6380, rate="256KiB/s")
    removed = rollbacks.remove_injected_faults()
    assert {f["id"] for f in removed} == {first["id"], second["id"]}
    assert active_ids() == set()
    actions.inject_fault("drop", cgroup=cgroup, ports=6379)
    aborted = actions.abort_all()
    assert len(aborted["reverted_fault_ids"]) == 1
    assert active_ids() == set()
