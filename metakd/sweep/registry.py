"""Who trains a missing teacher (or prepares missing data) when several trials need it at once.

A named, detached Ray actor per sweep maps artifact keys to "running" (with the owner and a
lease) or "done". The first trial to claim a key trains it; the others wait and read the
artifact from storage when it is complete. The store's ``_COMPLETE`` marker stays the source
of truth across restarts; the registry only arbitrates between live trials. An owner renews
its lease while it works, so a trial that died without releasing its keys loses them after
``lease_s`` and another trial takes over.
"""

from __future__ import annotations

import threading
import time

import ray

NAMESPACE = "metakd"


@ray.remote(num_cpus=0, max_concurrency=64)
class RegistryActor:
    def __init__(self, lease_s: float = 120.0):
        self.lease_s = lease_s
        self.running: dict[str, tuple[str, float]] = {}  # key -> (owner, lease expiry)
        self.done: set[str] = set()

    def claim(self, key: str, owner: str) -> str:
        if key in self.done:
            return "done"
        holder = self.running.get(key)
        if holder is not None and holder[0] != owner and holder[1] > time.monotonic():
            return "wait"
        self.running[key] = (owner, time.monotonic() + self.lease_s)
        return "mine"

    def renew(self, keys: list[str], owner: str) -> None:
        for key in keys:
            if self.running.get(key, (None,))[0] == owner:
                self.running[key] = (owner, time.monotonic() + self.lease_s)

    def finish(self, key: str) -> None:
        self.running.pop(key, None)
        self.done.add(key)

    def release(self, key: str, owner: str) -> None:
        if self.running.get(key, (None,))[0] == owner:
            del self.running[key]

    def reset(self) -> None:
        """A (re)started sweep driver: trials of an earlier driver are gone, so are their claims."""
        self.running.clear()


def registry_actor(sweep_name: str, lease_s: float = 120.0):
    return RegistryActor.options(name=f"registry-{sweep_name}", namespace=NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote(lease_s)


class RayRegistry:
    """The :class:`metakd.train.experiment.Registry` protocol over the actor, for one trial (owner)."""

    def __init__(self, actor, owner: str, renew_s: float = 10.0):
        self.actor, self.owner, self.renew_s = actor, owner, renew_s
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, key: str) -> str:
        answer = ray.get(self.actor.claim.remote(key, self.owner))
        if answer == "mine":
            self._held.add(key)
            self._start_renewing()
        return answer

    def finish(self, key: str) -> None:
        ray.get(self.actor.finish.remote(key))
        self._held.discard(key)

    def release(self, key: str) -> None:
        ray.get(self.actor.release.remote(key, self.owner))
        self._held.discard(key)

    def _start_renewing(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return

        def loop():
            while not self._stop.wait(self.renew_s):
                if self._held:
                    self.actor.renew.remote(sorted(self._held), self.owner)

        self._thread = threading.Thread(target=loop, daemon=True, name="metakd-lease")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
