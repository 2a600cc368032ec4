"""Claims on the artifact cache itself: who trains a missing artifact when several sweeps (or
``metakd run`` s) share one cache.

A sweep's registry (:mod:`metakd.jobs.registry`) arbitrates between the trials of *one* sweep;
two sweeps started together on one storage have two registries and would both train a teacher
they both need. So before a trainer builds a cache artifact it also takes a claim on the cache:

    <cache>/claims/<kind>-<key>.json    {group, owner, host, pid, token, since, heartbeat, lease_s}

``group`` is the sweep (its directory), ``owner`` the run in it. Between the runs of one group the
sweep's registry decides, so a claim of the trainer's own group never stops it: a run the
registry gave the key to takes over a claim its group left behind (a run that failed). The
claim's holder renews its heartbeat every ``lease_s / 6`` seconds while it trains and
removes the file once the artifact is published (or its training failed). Anyone else that needs
the artifact sees a live claim and waits for the ``_COMPLETE`` marker instead of training it. A
claim is dead, and taken over, when its heartbeat is older than ``lease_s`` or its process is gone
(same host).

Atomicity: on a local or NFS path a claim is a complete file hard-linked into place
(``os.link`` fails when the name exists, on NFS too), so two claimants cannot both win. A dead
claim is renamed aside first and re-checked, so a claimant never removes a live one it did not
see. On an object store (s3://, gs://) there is no create-if-absent through pyarrow: a claim is
read, put, and read back after ``SETTLE_S``; a claimant whose put lands after the other's
read-back also wins, so two sweeps started within the same second may both train a teacher (the
publish keeps the first complete copy: compute wasted, no result wrong).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from ..storage import Store

DIR = "claims"
LEASE_S = 300.0  # a claim without a heartbeat for this long is dead; the holder renews every lease_s / 6
SETTLE_S = 1.0  # object stores: how long a put claim is left before it is read back

log = logging.getLogger(__name__)


@dataclass
class Claim:
    group: str  # the sweep (or run) directory: one registry decides between the claimants of a group
    owner: str  # the run in the group
    host: str
    pid: int
    token: str
    since: float
    heartbeat: float
    lease_s: float

    def alive(self, now: float | None = None) -> bool:
        if (now or time.time()) - self.heartbeat > self.lease_s:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True


def claim_rel(rel: str) -> str:
    """``teachers/<key>`` -> ``claims/teachers-<key>.json``."""
    return f"{DIR}/{rel.replace('/', '-')}.json"


class StoreClaims:
    """This process's claims on the artifacts of ``store`` (the cache) for run ``owner`` of sweep
    ``group``, renewed in a background thread until released."""

    def __init__(self, store: Store, group: str, owner: str = "", lease_s: float = LEASE_S,
                 settle_s: float = SETTLE_S):
        self.store, self.group, self.owner, self.lease_s, self.settle_s = store, group, owner, lease_s, settle_s
        self._held: dict[str, Claim] = {}  # artifact rel -> our claim
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self, rel: str) -> Claim | None:
        """The live claim on artifact ``rel`` (anyone's, ours included), else None."""
        claim = self._read(claim_rel(rel))
        return claim if claim is not None and claim.alive() else None

    def foreign(self, rel: str) -> Claim | None:
        """The live claim on ``rel`` of another group (another sweep), else None."""
        claim = self.holder(rel)
        return claim if claim is not None and claim.group != self.group else None

    def listed(self) -> set[str]:
        """The claim files present now (live or not), as :func:`claim_rel` names: one listing."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.store.path(DIR), allow_not_found=True)
        return {f"{DIR}/{i.base_name}" for i in self.store.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def acquire(self, rel: str) -> bool:
        """Claim artifact ``rel``; False when another group (sweep) holds a live claim on it."""
        if rel in self._held:
            return True
        now = time.time()
        mine = Claim(self.group, self.owner, socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now, self.lease_s)
        path = claim_rel(rel)
        won = self._create_local(path, mine) if self.store.local_root is not None else self._create_remote(path, mine)
        if won:
            with self._lock:
                self._held[rel] = mine
            self._start_renewing()
        return won

    def release(self, rel: str) -> None:
        """Give up the claim on ``rel`` (its artifact is published, or its training failed)."""
        with self._lock:
            mine = self._held.pop(rel, None)
        if mine is None:
            return
        current = self._read(claim_rel(rel))
        if current is not None and current.token == mine.token:
            try:
                self.store.fs.delete_file(self.store.path(claim_rel(rel)))
            except OSError:  # gone already, or a storage error: the claim expires after lease_s
                pass

    def release_all(self) -> None:
        for rel in list(self._held):
            self.release(rel)

    def close(self) -> None:
        """Release every claim still held and stop renewing."""
        self.release_all()
        self._stop.set()

    # ---------------------------------------------------------------- files

    def _read(self, path: str) -> Claim | None:
        try:
            with self.store.fs.open_input_stream(self.store.path(path)) as f:
                return Claim(**json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # cut short or foreign: dead, taken over
            return Claim("?", "?", "?", -1, "", 0.0, 0.0, 0.0)

    def _create_local(self, path: str, mine: Claim) -> bool:
        final = self.store.local_root / path
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{mine.token[:8]}")
        tmp.write_text(json.dumps(asdict(mine)))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, final)  # atomic create-if-absent, NFS included
                    return True
                except FileExistsError:
                    pass
                other = self._read(path)
                if other is None:  # released meanwhile: link again
                    continue
                if other.alive() and other.group != self.group:
                    return False
                self._set_aside(final, other)
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _set_aside(self, final, seen: Claim) -> None:
        """Remove the claim ``seen`` at ``final`` (dead, or left by this group) without removing a live
        one that replaced it meanwhile: rename it aside (atomic), check it is the one seen, else put it back."""
        aside = final.with_name(f".{final.name}.dead-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(final, aside)
        except FileNotFoundError:
            return
        try:
            moved = Claim(**json.loads(aside.read_text()))
        except (OSError, ValueError, TypeError):
            moved = None
        if moved is not None and moved.token != seen.token and moved.alive():
            try:
                os.link(aside, final)  # another claimant's fresh claim: back in place
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _create_remote(self, path: str, mine: Claim) -> bool:
        other = self._read(path)
        if other is not None and other.alive() and other.group != self.group:
            return False
        self.store.write_json(path, asdict(mine))
        time.sleep(self.settle_s)
        back = self._read(path)
        return back is not None and back.token == mine.token

    # ---------------------------------------------------------------- heartbeat

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="metakd-cache-claims")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 6):
            with self._lock:
                held = dict(self._held)
            for rel, mine in held.items():
                current = self._read(claim_rel(rel))
                if current is None or current.token != mine.token:
                    log.warning("cache claim on %s lost (taken over after its lease ran out)", rel)
                    with self._lock:
                        self._held.pop(rel, None)
                    continue
                mine.heartbeat = time.time()
                try:
                    self.store.write_json(claim_rel(rel), asdict(mine))
                except OSError as e:  # transient: the next beat tries again, the lease covers five misses
                    log.warning("could not renew the cache claim on %s: %s", rel, e)
