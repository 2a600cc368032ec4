"""Claims on the artifact cache (metakd.jobs.claims): one sweep at a time trains an artifact,
dead claims are taken over, a sweep's own leftover claims never block it, and racing claimants
leave exactly one winner, on a local path and through the object-store protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from metakd.jobs.claims import StoreClaims, claim_rel
from metakd.storage import Store

REL = "teachers/abc"


def test_a_live_claim_of_another_sweep_blocks_until_released(tmp_path):
    store = Store(str(tmp_path))
    a, b = StoreClaims(store, "sweep-a", "run-1"), StoreClaims(store, "sweep-b", "run-1")
    assert a.acquire(REL)
    assert not b.acquire(REL)
    seen = b.foreign(REL)
    assert seen is not None and (seen.group, seen.owner) == ("sweep-a", "run-1")
    assert a.foreign(REL) is None  # its own group's claim is not foreign to it
    assert json.loads((tmp_path / claim_rel(REL)).read_text())["group"] == "sweep-a"
    a.release(REL)
    assert not (tmp_path / claim_rel(REL)).exists()
    assert b.acquire(REL) and b.foreign(REL) is None and a.foreign(REL).group == "sweep-b"
    b.close()
    a.close()


def test_a_claim_left_by_its_own_sweep_is_taken_over(tmp_path):
    """The sweep's registry gave the key to this run: a claim its group left (a failed run) does not block it."""
    store = Store(str(tmp_path))
    old, new = StoreClaims(store, "sweep-a", "run-1"), StoreClaims(store, "sweep-a", "run-2")
    assert old.acquire(REL)
    assert new.acquire(REL)
    assert json.loads((tmp_path / claim_rel(REL)).read_text())["owner"] == "run-2"
    old.release(REL)  # not its claim any more: left in place
    assert (tmp_path / claim_rel(REL)).exists()
    new.close()
    old.close()


def _write_claim(tmp_path, **fields) -> None:
    now = time.time()
    claim = {"group": "other", "owner": "r", "host": "elsewhere", "pid": 1, "token": "t", "since": now,
             "heartbeat": now, "lease_s": 60.0, **fields}
    path = tmp_path / claim_rel(REL)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(claim))


def test_dead_claims_are_taken_over(tmp_path):
    store = Store(str(tmp_path))
    mine = StoreClaims(store, "sweep-a", "run-1")
    _write_claim(tmp_path)  # live: another host, fresh heartbeat
    assert not mine.acquire(REL)
    _write_claim(tmp_path, heartbeat=time.time() - 61)  # no heartbeat for longer than its lease
    assert mine.acquire(REL)
    mine.close()
    # a process of this host that is gone
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    _write_claim(tmp_path, host=socket.gethostname(), pid=int(proc.stdout))
    assert mine.acquire(REL)
    mine.close()
    (tmp_path / claim_rel(REL)).write_text("{cut sh")  # a write cut short: dead
    assert mine.acquire(REL)
    mine.close()


def test_a_held_claim_is_renewed_past_its_lease(tmp_path):
    store = Store(str(tmp_path))
    a = StoreClaims(store, "sweep-a", "run-1", lease_s=0.6)
    b = StoreClaims(store, "sweep-b", "run-1", lease_s=0.6)
    assert a.acquire(REL)
    time.sleep(1.5)  # 2.5 leases: alive only because a renews it
    assert not b.acquire(REL)
    a.close()  # releases: b may take it at once
    assert b.acquire(REL)
    b.close()


@pytest.mark.parametrize("protocol", ["local", "object store"])
def test_racing_claimants_of_different_sweeps_leave_one_winner(tmp_path, protocol):
    stores = [Store(str(tmp_path)) for _ in range(6)]
    if protocol == "object store":  # put, then read back after settling: what s3:// and gs:// get
        for s in stores:
            s.local_root = None
        (tmp_path / "claims").mkdir()  # an object store needs no directories; the local filesystem under it does
    # the production settle time (1 s): at 0.3 s a claimant delayed between its look and its put by a loaded
    # machine could still write after another had read its own claim back (seen once, on a busy machine)
    claims = [StoreClaims(s, f"sweep-{i}", "run") for i, s in enumerate(stores)]
    start = threading.Barrier(len(claims))
    won = []

    def race(c):
        start.wait()
        if c.acquire(REL):
            won.append(c.group)

    threads = [threading.Thread(target=race, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert json.loads((tmp_path / claim_rel(REL)).read_text())["group"] == won[0]
    for c in claims:
        c.close()
