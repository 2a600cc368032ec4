"""When one trial starts its teacher and student runs: as soon as there is work and room.

A *run* is one launch of a per-worker function (one ``TorchTrainer.fit()`` on Ray, a thread
in-process) whose workers pull work from the registry (:mod:`metakd.jobs.workers`):

- teacher runs: while some teacher of the trial is missing and unclaimed, start another run of
  ``workers_per_trial`` ranks if the cluster has room for it. Each run trains teachers one after
  another until none is left to claim, so runs of this trial and of other trials train the
  missing teachers side by side, each exactly once.
- student run: as soon as one student job is ready (its teacher is published, or it needs none)
  and no student run of this trial is active, start one with up to ``student_workers`` workers
  (as many as fit now). Its workers claim ready jobs until none is left.
- where a teacher worker and a student worker take the same resources, teacher runs are
  ``RunPhase.BOTH`` runs: their worker goes on to the student jobs once no teacher is left to
  claim, and counts as the trial's student run.

A run that fails (its fit raised) gives back its claims at once, so that whoever takes them next
trains them, and is launched again under the same name, so that Ray Train restores its latest
checkpoint. An interrupted teacher resumes after its last checkpointed epoch, in this run or in
whichever run takes it (which finds the lost run's checkpoint through the ``run_failed`` event:
``metakd.jobs.workers``).
A run that failed because a node died (:meth:`Runner.lost_node`: spot reclaim, OOM, a bad host)
did nothing wrong: that does not count against ``runner.max_failures`` (``search.max_failures``),
only against :data:`LOST_NODE_RETRIES`, a bound against endless loops. Past either limit the
trial fails with the run's error. Each failure leaves an ``events/run_failed/`` file: the run,
its attempt, whether a node was lost, the claims it gave back (what was interrupted). Runs of a
trial with no work on the lost node do not notice it.

Room is what Ray reports available less what earlier admissions promised to runs that have not
started yet (:meth:`metakd.jobs.registry.RegistryState.admit`), so trials deciding at the same
moment do not all count the same free CPUs. Jobs and teachers finished by anyone (another trial,
an earlier driver, another sweep on the same cache) are read from the store, not trained again;
those another sweep trains now (its live claim on the cache: :mod:`metakd.jobs.claims`) are
waited for as if a run of this sweep trained them.

Runs are started by a :class:`Runner`: threads in this process (``metakd.jobs.experiment.LocalRunner``)
or ``TorchTrainer`` fits (``metakd.jobs.ray_runner.RayRunner``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol, runtime_checkable

from ..config import ExperimentConfig
from ..storage import Store
from .claims import StoreClaims, claim_rel
from .events import RUN_FAILED, write_event
from .registry import RegistryClient
from .workers import RunPhase, WorkerConfig
from ..train.student import StudentJob
from ..train.teacher import TeacherSpec

# Launches of one run after failures caused by lost nodes: not a budget (a lost node is not the
# run's fault), a bound on a cluster that keeps losing the nodes a run lands on.
LOST_NODE_RETRIES = 10
ELSEWHERE_S = 2.0  # how often a trial looks at the cache's claims: what other sweeps train now


@runtime_checkable
class Runner(Protocol):
    """Starts runs of the per-worker functions, and says how many fit: what :class:`TrialSchedule` asks.

    Resources are dicts as Ray counts them ({"CPU": 2.0, "GPU": 0.5}). A *unit* is what one
    admission reserves: a whole run, or one independent student worker of a student run.
    """

    poll_s: float  # seconds between the schedule's looks at the registry
    max_failures: int  # launches of a run again after failures of its own (not a lost node's)

    def combined(self) -> bool:
        """Whether teacher runs are ``RunPhase.BOTH`` runs (a teacher worker takes a student worker's resources)."""
        ...

    def demand(self, phase: RunPhase) -> dict[str, float]:
        """Resources of one unit of a run of ``phase``."""
        ...

    def workers(self, phase: RunPhase, units: int) -> int:
        """How many workers a run of ``phase`` admitted for ``units`` units starts."""
        ...

    def max_units(self, phase: RunPhase) -> int:
        """The most units one run of ``phase`` can use."""
        ...

    def available(self) -> dict[str, float]:
        """Resources free now."""
        ...

    def fits(self, per_unit: dict[str, float]) -> bool:
        """Whether the cluster as it is now could hold one unit at all (else it has to scale up)."""
        ...

    def gpus_per_worker(self, phase: RunPhase) -> float | None:
        """GPUs each worker of a run of ``phase`` gets (None: the worker is this process), which
        decides what ``precision: auto`` means for the artifacts it trains (``precision.planned``)."""
        ...

    def start(self, config: WorkerConfig, workers: int) -> list[dict]:
        """Run ``config.phase``'s per-worker function on ``workers`` workers to its end (blocking);
        returns what its rank-0 worker returned (teacher summaries, or student results)."""
        ...

    def lost_node(self, error: BaseException) -> bool:
        """Whether a failed run's ``error`` was caused by a node that died under it."""
        ...


class Run:
    """One launched run, working in a thread: ``fn()`` returns the summaries it trained."""

    def __init__(self, run_id: str, phase: RunPhase, units: int, workers: int, fn, attempt: int = 1):
        self.id, self.phase, self.units, self.workers, self.attempt = run_id, phase, units, workers, attempt
        self.value, self.error, self.started = None, None, time.time()
        self.thread = threading.Thread(target=self._work, args=(fn,), daemon=True, name=f"metakd-{run_id}")
        self.thread.start()

    def _work(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the trial's loop
            self.error = e

    def done(self) -> bool:
        return not self.thread.is_alive()


class TrialSchedule:
    """Trains (or reuses) every teacher and student job of one trial; see the module doc.

    ``data``: seed -> store rel path of the prepared data; ``source``: {trial_id, part}, recorded
    with every student trained here; ``on_students(new, so_far)``: called with the results of
    jobs as they finish. ``store`` holds the artifacts (the cache), ``events`` the event files
    (the sweep's directory; None: ``store``).
    """

    def __init__(self, cfg: ExperimentConfig, specs: list[TeacherSpec], jobs: list[StudentJob], data: dict[int, str],
                 store: Store, registry: RegistryClient, runner: Runner, source: dict, run_prefix: str, log=print,
                 on_students: Callable[[list[dict], list[dict]], None] | None = None, tracking=None,
                 events: Store | None = None):
        self.cfg, self.specs, self.jobs, self.data, self.source = cfg, specs, jobs, data, source
        self.tracking = tracking  # metakd.tracking.Tracking of the trial, handed to every run's workers
        self.store, self.registry, self.runner = store, registry, runner
        self.events = events or store
        self.claims = StoreClaims(store, self.events.root)  # only read here: what other sweeps train
        self.elsewhere: dict[str, str] = {}  # key -> owner: trained by another sweep on the cache now
        self.looked = float("-inf")
        self.prefix, self.log, self.on_students, self.poll_s = run_prefix, log, on_students, runner.poll_s
        self.runs: list[Run] = []
        self.launched = 0
        self.results: dict[str, dict] = {}  # job key -> result (trained here or elsewhere)
        self.teachers_trained: list[dict] = []
        self.failures: dict[tuple[str, bool], int] = {}  # (run id, lost a node) -> failures so far

    def run(self) -> tuple[list[dict], list[dict]]:
        """(results in job order, summaries of the teachers this trial trained)."""
        self._sync_store()
        self.registry.need("teacher", [s.key for s in self.specs])
        self.registry.need("student", [j.key for j in self.jobs])
        keys = [s.key for s in self.specs] + [j.key for j in self.jobs]
        try:
            while True:
                self._collect_runs()
                states = self._with_elsewhere(self.registry.states(keys))
                self._read_finished(states)
                if len(self.results) == len(self.jobs):
                    break
                available = self.runner.available()
                self._launch_teachers(states, available)
                self._launch_students(states, available)
                time.sleep(self.poll_s)
            while self.runs:  # they have nothing left to claim and end on their own
                self._collect_runs()
                time.sleep(self.poll_s / 4)
        except BaseException:
            for run in self.runs:
                self.registry.release_owner(run.id)
            raise
        return [self.results[j.key] for j in self.jobs], self.teachers_trained

    def _sync_store(self) -> None:
        """Artifacts already complete on the store (an earlier driver, another sweep) count as done."""
        rels = {s.key: s.rel for s in self.specs} | {j.key: j.rel for j in self.jobs}
        states = self.registry.states(list(rels))
        for key, rel in rels.items():
            if states[key][0] != "done" and self.store.is_complete(rel):
                self.registry.finish(key)

    def _with_elsewhere(self, states: dict) -> dict:
        """``states`` with what other sweeps on the cache do (looked at every ``ELSEWHERE_S``): a key
        missing here that another sweep holds a live cache claim on is ("running", that owner), so
        no run is launched for it; once that claim is gone, a key the other sweep published is done."""
        if time.monotonic() - self.looked >= ELSEWHERE_S:
            self.looked = time.monotonic()
            rels = {s.key: s.rel for s in self.specs} | {j.key: j.rel for j in self.jobs}
            listed = self.claims.listed()
            before, self.elsewhere = self.elsewhere, {}
            for key, (state, _) in states.items():
                if state != "missing":
                    continue
                claim = self.claims.foreign(rels[key]) if claim_rel(rels[key]) in listed else None
                if (claim is not None or key in before) and self.store.is_complete(rels[key]):
                    self.registry.finish(key)  # published there (its claim may linger until its next claim)
                    states[key] = ("done", None)
                elif claim is not None:
                    self.elsewhere[key] = f"{claim.group}:{claim.owner}"
                    if key not in before:
                        self.log(f"{rels[key]}: being trained by another sweep ({self.elsewhere[key]}); waiting for it")
        return {k: ("running", self.elsewhere[k]) if k in self.elsewhere and v[0] == "missing" else v
                for k, v in states.items()}

    def _collect_runs(self) -> None:
        for run in [r for r in self.runs if r.done()]:
            self.runs.remove(run)
            self.registry.started(run.id)  # drop its admission if it never got to start
            if run.error is not None:
                self._retry(run)
            elif run.phase.trains_teachers:
                self.teachers_trained.extend(run.value or [])

    def _retry(self, run: Run) -> None:
        """A failed run: its claims go back, an event says what was interrupted, and it starts
        again under its name, or the trial fails with its error (see the module doc)."""
        # The run's claims stay held until the event naming them exists: a run that takes over an
        # interrupted teacher finds its resume point through that event. Telling a lost node may take
        # seconds, so the claims are held (their leases restarted) before and given back after.
        interrupted = self.registry.hold(run.id)
        lost = self.runner.lost_node(run.error)
        self.registry.hold(run.id)
        count = self.failures[(run.id, lost)] = self.failures.get((run.id, lost), 0) + 1
        again = count <= (LOST_NODE_RETRIES if lost else self.runner.max_failures)
        error = f"{type(run.error).__name__}: {run.error}"
        record = {"type": RUN_FAILED, "key": run.id, "run": run.id, "trial_id": self.source.get("trial_id"),
                  "phase": str(run.phase), "attempt": run.attempt, "lost_node": lost, "interrupted": interrupted,
                  "retried": again, "start": run.started, "end": time.time(), "error": error[:2000]}
        write_event(self.events, RUN_FAILED, record)
        self.registry.release_owner(run.id)
        self.registry.note(record)
        cause = "lost a node" if lost else "failed"
        self.log(f"{run.id} {cause} (attempt {run.attempt}; gave back {interrupted or 'no claims'}): "
                 f"{error.splitlines()[0][:300]}" + ("; starting it again" if again else "; giving up"))
        if not again:
            raise run.error
        per_unit = self.runner.demand(run.phase)
        # at least one unit even without room: the run was admitted before, and a cluster that lost
        # a node sees the demand only from a launched run
        units = self.registry.admit(run.id, per_unit, run.units, self.runner.available(), True)
        self._start(run.id, run.phase, units, attempt=run.attempt + 1)

    def _read_finished(self, states: dict) -> None:
        new = []
        for job in self.jobs:
            if states[job.key][0] == "done" and job.key not in self.results:
                self.results[job.key] = self.store.read_json(f"{job.rel}/result.json")
                new.append(job.key)
        if new and self.on_students is not None:
            self.on_students([self.results[k] for k in new], [self.results[j.key] for j in self.jobs
                                                              if j.key in self.results])

    def _admit(self, phase: RunPhase, units: int, per_unit: dict, available: dict,
               active: list[Run]) -> tuple[str, int]:
        run_id = f"{self.prefix}-{phase}-{self.launched}"
        # a cluster that cannot hold one unit now must scale up, and sees demand only from a launched run
        grow = not active and not self.runner.fits(per_unit)
        return run_id, self.registry.admit(run_id, per_unit, units, available, grow)

    def _launch_teachers(self, states: dict, available: dict) -> None:
        missing = [s for s in self.specs if states[s.key][0] == "missing"]
        holders = {states[s.key][1] for s in self.specs if states[s.key][0] == "running"}
        runs = [r for r in self.runs if r.phase.trains_teachers]
        starting = [r for r in runs if r.id not in holders]  # each about to claim one (or done with teachers)
        phase = RunPhase.BOTH if self.runner.combined() else RunPhase.TEACHERS
        per_run = self.runner.demand(phase)
        for _ in range(len(missing) - len(starting)):
            run_id, n = self._admit(phase, 1, per_run, available, runs)
            if n == 0:
                return
            self._start(run_id, phase, 1)
            runs.append(self.runs[-1])

    def _launch_students(self, states: dict, available: dict) -> None:
        runs = [r for r in self.runs if r.phase.trains_students]
        if runs:
            return

        def ready(job: StudentJob) -> bool:
            return states[job.key][0] == "missing" and (not job.teacher_key or states[job.teacher_key][0] == "done")

        if not any(ready(j) for j in self.jobs):
            return
        open_jobs = sum(states[j.key][0] == "missing" for j in self.jobs)
        phase = RunPhase.STUDENTS
        per_unit, units = self.runner.demand(phase), self.runner.max_units(phase)
        run_id, n = self._admit(phase, min(units, open_jobs), per_unit, available, runs)
        if n > 0:
            self._start(run_id, phase, n)

    def _start(self, run_id: str, phase: RunPhase, units: int, attempt: int = 1) -> None:
        """Launch run ``run_id`` of ``units`` admitted units; ``attempt``: 1, or 1 + its failed launches."""
        self.launched += attempt == 1  # a run launched again keeps its name
        workers = self.runner.workers(phase, units)
        what = {RunPhase.TEACHERS: f"{len(self.specs)} teacher(s)",
                RunPhase.STUDENTS: f"{len(self.jobs)} student job(s)",
                RunPhase.BOTH: f"{len(self.specs)} teacher(s), then {len(self.jobs)} student job(s)"}[phase]
        self.log(f"starting {run_id}" + (f" again (attempt {attempt})" if attempt > 1 else "")
                 + f": {workers} worker(s) for {what}")
        config = WorkerConfig(phase, run_id, self.cfg, self.store.root, self.data, self.registry, self.source,
                              tuple(self.specs), tuple(self.jobs), tracking=self.tracking, attempt=attempt,
                              events=self.events.root)
        self.runs.append(Run(run_id, phase, units, workers, lambda: self.runner.start(config, workers), attempt))
