"""The sweep's console: Tune's trial table, one line per finished teacher or student, nothing else.

By default (``metakd sweep`` without ``--verbose``) Ray's own output is off: workers' and
trial drivers' stdout stay in Ray's log files (``log_to_driver=False``), Tune's reporter is
silent, Ray logs only warnings. :class:`SweepConsole`, a Tune callback in the driver, prints
instead:

- one line per finished training, read from the sweep registry's log (every trial's trainings),
  and one per run that failed (a lost node: launched again);
- the trial table (status, searched values, students finished, the metric) every
  ``table_every_s`` seconds and at the end, headed by a line that says how many teachers are
  trained, training and still to train, so a long teacher phase does not look idle.
"""

from __future__ import annotations

import time

from ray.tune import Callback

from ..jobs.events import RUN_FAILED
from ..jobs.registry import sweep_registry

TRIAL_PREFIX = "trial_driver_"


def training_line(record: dict, done: int, needed: int) -> str:
    """``teacher meta seed=0: dev 91.7% in 5.2s (teachers 1/3 done)``: one finished training
    (a registry record), with how many teachers (or students) are done so far out of those the trials need."""
    took = f"{record.get('train_seconds', record['end'] - record['start']):.1f}s"
    dev = record.get("dev_accuracy")
    dev = f"dev {dev:.1%}" if isinstance(dev, float) else "dev -"
    if record.get("status", "ok") != "ok":  # a job that failed on its own (out of memory): its error names it
        dev = f"FAILED ({record.get('error')})"
    if record.get("type") == "teacher":
        what = f"teacher {record['kind']}{':' + record['domain'] if record.get('domain') else ''} seed={record['seed']}"
        return f"{what}: {dev} in {took}  (teachers {done}/{needed} done)"
    what = f"student {record['method']} {record['domain']} seed={record['seed']}"
    trial = str(record.get("trial_id") or "").removeprefix(TRIAL_PREFIX)
    return f"{what}: {dev} in {took}  [{trial}] (students {done}/{needed} done)"


def failure_line(record: dict) -> str:
    """``run 606b2_00000-teachers-1 lost its node (attempt 1), interrupting 1 training: starting it again``:
    a run that failed (a ``run_failed`` record of ``metakd.jobs.schedule``)."""
    run = str(record["run"]).removeprefix(TRIAL_PREFIX)
    cause = "lost its node" if record.get("lost_node") else f"failed ({record.get('error', '').splitlines()[0][:200]})"
    n = len(record.get("interrupted") or [])
    what = f"interrupting {n} training{'s' if n != 1 else ''}" if n else "with nothing in training"
    return f"run {run} {cause} (attempt {record.get('attempt', 1)}), {what}: " + \
        ("starting it again" if record.get("retried") else "giving up, its trial fails")


def status_line(counts: dict) -> str:
    t, s = counts.get("teacher"), counts.get("student")
    parts = []
    if t:
        todo = t["needed"] - t["done"] - t["running"]
        parts.append(f"teachers {t['done']}/{t['needed']} trained" + (f", {t['running']} training" if t["running"]
                                                                       else "") + (f", {todo} to train" if todo else ""))
    if s:
        parts.append(f"students {s['done']}/{s['needed']} trained" + (f", {s['running']} training" if s["running"]
                                                                       else ""))
    return "; ".join(parts)


def trial_table(trials, metric: str, params: list[str]) -> list[str]:
    """One line per trial: name, status, searched values, students finished, the metric."""
    header = ["trial", "status", *params, "students", metric]
    rows = []
    for t in trials:
        last = t.last_result or {}
        value = last.get(metric)
        rows.append([str(t).removeprefix(TRIAL_PREFIX), t.status, *[_short(t.config.get(p)) for p in params],
                     str(last.get("jobs_done", 0)), f"{value:.2%}" if isinstance(value, float) else "-"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def _short(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


class SweepConsole(Callback):
    """Prints the sweep's progress (see the module doc), reading the registry of sweep ``sweep``.

    The registry is found by name when first needed, not pickled: Tune saves its callbacks with
    the experiment, and a resumed sweep runs in a new Ray session.
    """

    def __init__(self, sweep: str, metric: str, params: list[str], poll_s: float = 1.0,
                 table_every_s: float = 30.0, out=print):
        self.sweep, self.metric, self.params = sweep, metric, params
        self.poll_s, self.table_every_s, self.out = poll_s, table_every_s, out
        self._reset()

    def _reset(self) -> None:
        self.registry = None
        self.seen = 0
        self.counts: dict = {}
        self.last_poll = 0.0
        self.last_table = time.monotonic()

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("sweep", "metric", "params", "poll_s", "table_every_s")}

    def __setstate__(self, state):
        self.__dict__.update(state, out=print)
        self._reset()

    def _poll(self) -> None:
        try:
            if self.registry is None:
                self.registry = sweep_registry(self.sweep, owner="console")
            records, self.seen, self.counts = self.registry.progress(self.seen)
        except Exception:  # the registry is gone (Ray shutting down): nothing more to print
            return
        for i, record in enumerate(records):
            if record.get("type") == RUN_FAILED:
                self.out(failure_line(record))
                continue
            artifact = record.get("type", "student")
            c = self.counts.get(artifact, {})
            later = sum(r.get("type", "student") == artifact for r in records[i + 1:])
            self.out(training_line(record, c.get("done", 0) - later, c.get("needed", 0)))

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_poll >= self.poll_s:
            self.last_poll = now
            self._poll()
        if now - self.last_table >= self.table_every_s and trials:
            self.last_table = now
            self._table(trials)

    def on_experiment_end(self, trials, **info):
        self._poll()
        self._table(trials)

    def _table(self, trials) -> None:
        by_status: dict[str, int] = {}
        for t in trials:
            by_status[t.status] = by_status.get(t.status, 0) + 1
        head = ", ".join(f"{n} {s}" for s, n in by_status.items())
        status = status_line(self.counts)
        self.out(f"-- trials: {head}" + (f"; {status}" if status else ""))
        for line in trial_table(trials, self.metric, self.params):
            self.out("   " + line)
