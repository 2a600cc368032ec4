"""The registry: claims and leases, admissions of runs, progress counts and the log of trainings."""

from __future__ import annotations

import pickle
import time

import pytest

from metakd.jobs.registry import LocalRegistry, RegistryState


def test_claims_are_exclusive_until_finished_released_or_expired():
    r = RegistryState(lease_s=0.3)
    assert r.claim("k", "a") == "mine"
    assert r.claim("k", "b") == "wait" and r.claim("k", "a") == "mine"  # the owner may claim again
    assert r.states(["k", "x"]) == {"k": ("running", "a"), "x": ("missing", None)}
    time.sleep(0.35)  # a dead owner stops renewing: its lease runs out
    assert r.states(["k"]) == {"k": ("missing", None)}
    assert r.claim("k", "b") == "mine"
    r.renew(["k"], "a")  # not a's any more: no effect
    r.release("k", "a")
    assert r.claim("k", "a") == "wait"
    assert not r.finish("k", "a", {"type": "teacher", "key": "k"})  # b holds it: not a's to finish
    assert r.states(["k"]) == {"k": ("running", "b")} and r.progress()[0] == []
    assert r.finish("k", "b", {"type": "teacher", "key": "k"})
    assert r.claim("k", "a") == "done" and r.states(["k"]) == {"k": ("done", None)}
    # a failed run gives back its own claims and its workers' ("run/w0", ...), not others'
    for key, owner in (("p", "run"), ("q", "run/w0"), ("s", "runner")):
        assert r.claim(key, owner) == "mine"
    assert sorted(r.release_owner("run")) == ["p", "q"]
    assert r.states(["p", "q", "s"]) == {"p": ("missing", None), "q": ("missing", None), "s": ("running", "runner")}


def test_admission_counts_what_was_promised_to_runs_that_have_not_started():
    r = RegistryState()
    free = {"CPU": 2.0, "GPU": 1.0}
    assert r.admit("t1", {"CPU": 1.0}, 1, free) == 1
    assert r.admit("t2", {"CPU": 1.0}, 3, free) == 1  # 2 CPUs free, 1 promised to t1
    assert r.admit("t3", {"CPU": 1.0}, 1, free) == 0
    assert r.admit("t3", {"CPU": 1.0}, 1, free, at_least_one=True) == 1  # a cluster that must scale up
    r.started("t1"), r.started("t2"), r.started("t3")
    # quarter-GPU student workers: 4 fit on one GPU, whatever the CPUs say first
    assert r.admit("s", {"CPU": 0.5, "GPU": 0.25}, 8, free) == 4
    assert r.admit("s2", {"CPU": 0.5, "GPU": 0.25}, 8, free) == 0
    r.started("s")
    assert r.admit("s2", {"CPU": 0.5, "GPU": 0.25}, 2, {"CPU": 0.0, "GPU": 1.0}) == 0  # no CPU left


def test_registry_counts_needed_done_and_training_and_logs_finished_trainings():
    r = RegistryState()
    r.need("teacher", ["a", "b", "c"])
    r.need("teacher", ["a"])  # another trial needs the same teacher: still 3
    r.claim("a", "t1")
    r.finish("b", "t2", {"type": "teacher", "key": "b"})  # nobody held it: anyone may finish it
    r.finish("b", "t2", {"type": "teacher", "key": "b"})  # a late duplicate finish logs nothing new
    records, seen, counts = r.progress()
    assert [x["key"] for x in records] == ["b"] and seen == 1
    assert counts == {"teacher": {"needed": 3, "done": 1, "running": 1}}
    assert r.progress(seen)[0] == []
    r.reset()  # a new driver: nothing live, nothing remembered (the store says what is done)
    assert r.progress() == ([], 0, {}) and r.claim("b", "x") == "mine"


def test_a_local_registry_cannot_travel_to_another_process():
    """A worker config holds the registry: under Ray it must be the actor's client (ray_registry)."""
    with pytest.raises(TypeError, match="ray_registry"):
        pickle.dumps(LocalRegistry())


def test_a_renewal_that_fails_is_retried_and_the_lease_kept():
    registry = LocalRegistry(lease_s=0.4, renew_s=0.1)
    state = registry.backend
    real, calls = state.renew, []

    def flaky(keys, owner):  # the registry hiccups once (a busy actor, a network blip)
        calls.append(keys)
        if len(calls) == 1:
            raise ConnectionError("registry unreachable")
        return real(keys, owner)

    state.renew = flaky
    try:
        assert registry.claim("k") == "mine"
        time.sleep(1.2)  # three leases: only renewals after the failure keep it
        assert len(calls) >= 3
        assert state.claim("k", "other") == "wait" and state.states(["k"]) == {"k": ("running", "local")}
    finally:
        registry.close()


def test_still_mine_says_whether_the_owner_may_publish():
    a = LocalRegistry(lease_s=0.2, renew_s=100.0)  # renewals never come in time: the lease runs out
    state, b = a.backend, a.for_owner("b")
    assert a.claim("k") == "mine" and a.still_mine("k")
    time.sleep(0.25)
    assert a.still_mine("k")  # ran out, but nobody took it: still a's, renewed
    time.sleep(0.25)
    assert b.claim("k") == "mine"  # ran out again, and b took it over
    assert not a.still_mine("k") and state.states(["k"]) == {"k": ("running", "b")}
    assert not a.finish("k") and state.states(["k"]) == {"k": ("running", "b")}  # not a's to finish
    assert b.finish("k", {"type": "teacher", "key": "k"})
    assert not a.still_mine("k") and not b.still_mine("k")  # done: nothing left to publish
    assert state.renew(["k", "x"], "b") == ["k", "x"]  # neither held by b any more
    a.close(), b.close()


def test_hold_keeps_a_failed_runs_claims_and_restarts_their_leases(monkeypatch):
    """A failed run's driver holds its claims (and its workers') while it writes the run_failed event,
    then gives them back: nobody can take them in between."""
    import metakd.jobs.registry as reg

    now = [100.0]
    monkeypatch.setattr(reg.time, "monotonic", lambda: now[0])
    state = reg.RegistryState(lease_s=60.0)
    assert state.claim("t1", "run-a") == "mine" and state.claim("s1", "run-a/w0") == "mine"
    assert state.claim("t2", "run-b") == "mine"
    now[0] = 150.0
    assert sorted(state.hold("run-a")) == ["s1", "t1"]
    now[0] = 200.0  # past the first lease, within the restarted one
    assert state.claim("t1", "run-c") == "wait" and state.claim("t2", "run-c") == "mine"
    assert sorted(state.release_owner("run-a")) == ["s1", "t1"]
    assert state.claim("t1", "run-c") == "mine"


def test_a_renewal_tells_the_owner_its_key_was_taken_over():
    a = LocalRegistry(lease_s=0.3, renew_s=0.05)
    state, b = a.backend, a.for_owner("b")
    real, down = state.renew, [True]

    def renew(keys, owner):  # a's node cannot reach the registry for a while
        if owner == "local" and down[0]:
            raise ConnectionError("registry unreachable")
        return real(keys, owner)

    state.renew = renew
    try:
        assert a.claim("k") == "mine" and a.claim("j") == "mine" and not a.lost_lease("k")
        time.sleep(0.4)  # a's leases ran out
        assert b.claim("k") == "mine"  # b took k over; j is nobody's
        down[0] = False
        deadline = time.monotonic() + 5
        while not a.lost_lease("k") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.lost_lease("k") and not b.lost_lease("k")
        assert not a.lost_lease("j")  # renewed again: nobody else had it
        assert a.still_mine("j") and not a.still_mine("k")
    finally:
        a.close(), b.close()
