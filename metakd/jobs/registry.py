"""Who trains what: one owner per missing artifact (prepared data, teacher, student job), run admission.

The store's ``_COMPLETE`` marker is the source of truth across restarts; the registry only
arbitrates between live trainers. :class:`RegistryState` holds

- claims: key -> (owner, lease expiry), and the keys that are done. The first owner to claim a
  missing key trains it; the others skip it (or wait for it). An owner renews its lease while it
  works, so the claims of a trainer that died expire after ``lease_s`` and another takes over.
  A trainer whose lease ran out anyway (renewals that failed for longer than the lease) learns
  it from its next renewal (:meth:`RegistryClient.lost_lease`: the training stops at its next
  progress line or epoch end) or, at the latest, right before publishing
  (:meth:`RegistryClient.still_mine`), and drops its work; only the owner finishes a key it holds.
- admissions: resources promised to runs that were launched but have not started yet, so that
  trials deciding at the same moment do not all count the same free CPUs / GPUs.
- a log of finished trainings, which the sweep's console prints.

:class:`LocalRegistry` keeps the state in this process (``metakd run``, tests);
:func:`ray_registry` keeps it in a named Ray actor shared by every trial driver and worker of a
sweep. Both are :class:`RegistryClient` s, which also travel inside a worker's config.

The sweep's actor lives on the head node (:func:`ray_registry`), not wherever Ray finds room: a
worker node can die at any time (spot reclaim, OOM), and an actor on it would take every trial's
claims with it; the head holds the sweep's driver and the trial drivers, so its loss ends the
sweep anyway. The actor is not restarted by Ray: a restarted one would start empty while
trainers are still at work under claims it forgot, and the store's ``_COMPLETE`` markers tell a
published artifact from a missing one, not from one in training, so an empty registry could let
a second trainer start what a first is still training. If the actor dies all the same (its
process killed on a live head), the trial drivers fail at their next call, their trials fail and
the sweep exits 1; running the same command again creates a new actor, reads what is complete from the store and
trains only what is missing.
"""

from __future__ import annotations

import logging
import math
import threading
import time

NAMESPACE = "metakd"
LEASE_S = 60.0
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node advertises it
RESERVE_S = 120.0  # an admission whose run never reported its start is forgotten after this long
RETRY_S = 0.5  # first retry of a failed lease renewal
GONE_S = 300.0  # a registry that has not answered renewals for this long is gone (the sweep ended)

log = logging.getLogger(__name__)


class RegistryState:
    """The registry's state and operations; plain Python (the actor body, or used in-process)."""

    def __init__(self, lease_s: float = LEASE_S, reserve_s: float = RESERVE_S):
        self.lease_s, self.reserve_s = lease_s, reserve_s
        self.running: dict[str, tuple[str, float]] = {}  # key -> (owner, lease expiry)
        self.done: set[str] = set()
        self.needed: dict[str, set[str]] = {}  # artifact ("teacher", "student") -> keys some trial needs
        self.admitted: dict[str, tuple[dict, float]] = {}  # run id -> (resources, when)
        self.log: list[dict] = []

    def _live(self, key: str) -> tuple[str, float] | None:
        holder = self.running.get(key)
        return holder if holder is not None and holder[1] > time.monotonic() else None

    def claim(self, key: str, owner: str) -> str:
        """"done", "wait" (another owner holds a live lease) or "mine" (the caller trains it now)."""
        if key in self.done:
            return "done"
        holder = self._live(key)
        if holder is not None and holder[0] != owner:
            return "wait"
        self.running[key] = (owner, time.monotonic() + self.lease_s)
        return "mine"

    def renew(self, keys: list[str], owner: str) -> list[str]:
        """Extend ``owner``'s leases on ``keys``; returns the keys it no longer holds (finished,
        released, or taken over by another owner after its lease ran out)."""
        lost = []
        for key in keys:
            if self.running.get(key, (None,))[0] == owner:
                self.running[key] = (owner, time.monotonic() + self.lease_s)
            else:
                lost.append(key)
        return lost

    def finish(self, key: str, owner: str, record: dict | None = None) -> bool:
        """``key`` is done (its artifact, or its failed result, is on the store); ``record`` goes to the log.

        Refused (False, nothing changes) while another owner holds a live lease on ``key``: that
        owner trains it now, and finishes it itself. Anyone may finish a key nobody holds (it was
        found complete on the store)."""
        if key in self.done:
            return True
        holder = self._live(key)
        if holder is not None and holder[0] != owner:
            return False
        self.running.pop(key, None)
        if record is not None:
            self.log.append(record)
        self.done.add(key)
        return True

    def release(self, key: str, owner: str) -> None:
        if self.running.get(key, (None,))[0] == owner:
            del self.running[key]

    def release_owner(self, owner: str) -> list[str]:
        """Drop every claim of ``owner`` and of its workers (``owner/...``): the next claim gets them."""
        keys = self.hold(owner)
        for key in keys:
            del self.running[key]
        return keys

    def hold(self, owner: str) -> list[str]:
        """The keys claimed by ``owner`` and its workers, their leases restarted now: a run that failed
        keeps its claims while its driver records what it interrupted, before giving them back."""
        keys = [k for k, (o, _) in self.running.items() if o == owner or o.startswith(owner + "/")]
        for key in keys:
            self.running[key] = (self.running[key][0], time.monotonic() + self.lease_s)
        return keys

    def states(self, keys: list[str]) -> dict[str, tuple[str, str | None]]:
        """key -> ("done", None) | ("running", owner) | ("missing", None); an expired lease is missing."""
        out = {}
        for key in keys:
            holder = self._live(key)
            out[key] = ("done", None) if key in self.done else ("running", holder[0]) if holder else ("missing", None)
        return out

    def need(self, artifact: str, keys: list[str]) -> None:
        """Some trial needs the ``artifact`` s ("teacher", "student") ``keys``: counted by :meth:`progress`."""
        self.needed.setdefault(artifact, set()).update(keys)

    def admit(self, run: str, per_unit: dict, units: int, available: dict, at_least_one: bool = False) -> int:
        """How many of ``units`` (each needing ``per_unit`` resources) to start for ``run`` now.

        Counts ``available`` less what earlier admissions promised to runs that have not started
        (see :meth:`started`); reserves the answer for ``run``. ``at_least_one``: answer 1 even
        without room (a cluster that must scale up sees demand only from a launched run).
        """
        now = time.monotonic()
        self.admitted = {r: v for r, v in self.admitted.items() if now - v[1] < self.reserve_s}
        n = units
        for res, need in per_unit.items():
            if need > 0:
                promised = sum(v[0].get(res, 0.0) for v in self.admitted.values())
                n = min(n, math.floor((available.get(res, 0.0) - promised) / need + 1e-9))
        n = max(n, 1 if at_least_one else 0)
        if n > 0:
            self.admitted[run] = ({res: need * n for res, need in per_unit.items()}, now)
        return n

    def started(self, run: str) -> None:
        """The run holds its resources now (or ended): its admission no longer needs reserving."""
        self.admitted.pop(run, None)

    def note(self, record: dict) -> None:
        """Add ``record`` (a run that failed, ``metakd.jobs.schedule``) to the log the console prints."""
        self.log.append(record)

    def progress(self, since: int = 0) -> tuple[list[dict], int, dict]:
        """(log records from index ``since``, next index, per artifact {needed, done, running} counts)."""
        live = {k for k in self.running if self._live(k)}
        counts = {artifact: {"needed": len(keys), "done": len(keys & self.done), "running": len(keys & live)}
                  for artifact, keys in self.needed.items()}
        return self.log[since:], len(self.log), counts

    def reset(self) -> None:
        """A (re)started sweep driver: the trials of an earlier driver are gone, so are their claims;
        what is done is read from the store again."""
        self.__init__(self.lease_s, self.reserve_s)


class RegistryClient:
    """One owner's view of a registry (the state in this process, or a Ray actor).

    Keys claimed with :meth:`claim` are renewed in a background thread until finished or released.
    A client pickles (into a Ray Train worker's config) as its backend and owner only.
    """

    def __init__(self, backend, owner: str = "local", renew_s: float = 10.0):
        self.backend, self.owner, self.renew_s = backend, owner, renew_s
        self._init_local()

    def _init_local(self) -> None:
        self._held: set[str] = set()
        self._lost: set[str] = set()  # held keys a renewal found taken over (or finished) by another owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = getattr(self.backend, "_metakd_lock", None)
        if isinstance(self.backend, RegistryState) and self._lock is None:
            self._lock = self.backend._metakd_lock = threading.Lock()

    def __getstate__(self):
        if isinstance(self.backend, RegistryState):
            raise TypeError("a LocalRegistry lives in one process; a Ray worker needs ray_registry()")
        return {"backend": self.backend, "owner": self.owner, "renew_s": self.renew_s}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local()

    def _call(self, name: str, *args):
        if isinstance(self.backend, RegistryState):
            with self._lock:
                return getattr(self.backend, name)(*args)
        import ray

        return ray.get(getattr(self.backend, name).remote(*args))

    def for_owner(self, owner: str) -> RegistryClient:
        """The same registry as seen by another owner (a worker, a run)."""
        return RegistryClient(self.backend, owner, self.renew_s)

    def claim(self, key: str) -> str:
        answer = self._call("claim", key, self.owner)
        if answer == "mine":
            self._held.add(key)
            self._lost.discard(key)
            self._start_renewing()
        return answer

    def lost_lease(self, key: str) -> bool:
        """Whether the last renewal found ``key`` no longer this owner's (no call: the lease thread's
        answer): a training of it is to stop, another owner trains it now (:meth:`still_mine` asks)."""
        return key in self._lost

    def finish(self, key: str, record: dict | None = None) -> bool:
        """Mark ``key`` done (:meth:`RegistryState.finish`); False, and a warning, when another owner
        holds it now."""
        self._held.discard(key)
        done = self._call("finish", key, self.owner, record)
        if not done:
            log.warning("registry: %s did not finish %s: another owner holds it now", self.owner, key)
        return done

    def still_mine(self, key: str) -> bool:
        """Whether this owner may still publish ``key`` (asked right before publishing): it holds the
        lease (renewed now), or nobody does and nobody finished it. False when the lease ran out and
        another owner took the key over, or finished it: this owner's work on it is to be dropped."""
        mine = self._call("claim", key, self.owner) == "mine"
        if mine:
            self._held.add(key)
            self._lost.discard(key)
            self._start_renewing()
        else:
            self._held.discard(key)
        return mine

    def release(self, key: str) -> None:
        self._call("release", key, self.owner)
        self._held.discard(key)

    def release_owner(self, owner: str | None = None) -> list[str]:
        return self._call("release_owner", owner or self.owner)

    def hold(self, owner: str) -> list[str]:
        return self._call("hold", owner)

    def states(self, keys: list[str]) -> dict[str, tuple[str, str | None]]:
        return self._call("states", list(keys)) if keys else {}

    def need(self, artifact: str, keys: list[str]) -> None:
        self._call("need", artifact, list(keys))

    def admit(self, run: str, per_unit: dict, units: int, available: dict, at_least_one: bool = False) -> int:
        return self._call("admit", run, per_unit, units, available, at_least_one)

    def started(self, run: str) -> None:
        self._call("started", run)

    def note(self, record: dict) -> None:
        self._call("note", record)

    def progress(self, since: int = 0):
        return self._call("progress", since)

    def reset(self) -> None:
        self._call("reset")

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return

        def loop():
            # A failed renewal is retried sooner (0.5 s, doubling up to renew_s): a registry that
            # hiccups (a busy or restarting actor, a network blip) must not cost the lease. Only
            # one that has not answered for GONE_S is taken for gone (the sweep ended).
            delay, failing_since = self.renew_s, None
            while not self._stop.wait(delay):
                keys = sorted(self._held.copy())  # the worker's thread adds and drops keys meanwhile
                if not keys:
                    delay, failing_since = self.renew_s, None
                    continue
                try:
                    lost = self._call("renew", keys, self.owner)
                    # still held meanwhile (not finished or released here since the copy): taken over
                    self._lost.update(k for k in lost or () if k in self._held)
                except Exception as e:  # noqa: BLE001 - any failure of the call is retried
                    now = time.monotonic()
                    if failing_since is None:
                        failing_since, delay = now, RETRY_S
                        log.warning("registry: renewing %s's leases failed (%s); retrying", self.owner, e)
                    elif now - failing_since > GONE_S:
                        log.warning("registry: no answer for %.0fs, taken for gone; %s stops renewing",
                                    now - failing_since, self.owner)
                        return
                    else:
                        delay *= 2
                    delay = min(delay, self.renew_s)
                    continue
                delay, failing_since = self.renew_s, None

        self._thread = threading.Thread(target=loop, daemon=True, name="metakd-lease")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()


class LocalRegistry(RegistryClient):
    """The registry in this process: whoever asks first trains (``metakd run``, tests)."""

    def __init__(self, lease_s: float = LEASE_S, renew_s: float | None = None):
        super().__init__(RegistryState(lease_s), owner="local", renew_s=renew_s or lease_s / 6)

    @property
    def state(self) -> dict[str, str]:
        """key -> "running" | "done"."""
        with self._lock:
            out = {k: "running" for k in self.backend.running}
            out.update({k: "done" for k in self.backend.done})
        return out


def ray_registry(name: str, owner: str, lease_s: float = LEASE_S, detached: bool = True) -> RegistryClient:
    """A client of the named registry actor, created on first use.

    Detached for a sweep: trials and a restarted driver find the same actor by name; its state
    only arbitrates between live trainers, the store keeps what is complete. Created on the head
    node, never on a worker node that may die under it (see the module doc).
    """
    import ray

    actor_cls = ray.remote(num_cpus=0)(RegistryState)
    options = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    head = head_node_id()
    if head is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
    if detached:
        options["lifetime"] = "detached"
    return RegistryClient(actor_cls.options(**options).remote(lease_s), owner)


def head_node_id() -> str | None:
    """The id of the cluster's head node (the live node with Ray's ``node:__internal_head__``
    resource), or None when Ray names none."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return None


def sweep_registry(sweep: str, owner: str) -> RegistryClient:
    """The sweep's registry actor (detached, named after the sweep): claims, admissions, training log."""
    return ray_registry(f"registry-{sweep}", owner)
