"""The trial's schedule: which runs start when, with what config (a fake runner, no training), and
trials that share a store (in-process, racing in two threads): every teacher and every distinct
student job is trained once, reused rows say so, and the analyses count a shared student once."""

from __future__ import annotations

import copy
import inspect
import json
import tempfile
import threading
import time

import pandas as pd
import pytest

from metakd.config import ResourcesConfig, from_dict
from metakd.jobs import schedule as schedule_module
from metakd.jobs.events import RUN_FAILED, STUDENT, TEACHER, count_student_trainings, count_teacher_trainings, \
    read_events
from metakd.jobs.experiment import LocalRunner, plan, run_experiment
from metakd.jobs.ray_runner import RayRunner
from metakd.jobs.registry import LocalRegistry
from metakd.jobs.schedule import Runner, TrialSchedule
from metakd.jobs.workers import RunPhase, WorkerConfig
from metakd.report import analysis, results
from metakd.report.rows import result_rows
from metakd.storage import Store
from metakd.train.student import StudentJob

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY = {
    "name": "sched", "methods": ["metakd", "kd_single"], "seeds": [0], "device": "cpu",
    "data": {"max_length": 24, "vocab_size": 400,
             "synthetic": {"num_domains": 2, "examples_per_domain": 120, "words_per_example": 16,
                           "shared_vocab": 40, "domain_vocab": 20, "label_noise": 0.0}},
    "teacher": {"preset": "tiny-teacher", "epochs": 2, "lr": 2e-3, "batch_size": 16},
    "student": "tiny-student",
    "distill": {"stage1_epochs": 1, "stage1_lr": 3e-3, "stage2_epochs": 1, "stage2_lr": 3e-3,
                "epochs": 1, "lr": 3e-3, "batch_size": 16},
}


def _cfg(**distill):
    raw = copy.deepcopy(TINY)
    raw["distill"].update(distill)
    return from_dict(raw)


def _quiet(*_a, **_k):
    pass


# ----------------------------------------------------------------------------- the runners


@pytest.mark.parametrize("runner", [LocalRunner(), RayRunner(ResourcesConfig(), "unused")], ids=["local", "ray"])
def test_both_runners_implement_the_runner_protocol(runner):
    assert isinstance(runner, Runner) and runner.poll_s > 0
    methods = [n for n, v in vars(Runner).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert sorted(methods) == ["available", "combined", "demand", "fits", "gpus_per_worker", "lost_node", "max_units",
                               "start", "workers"]
    assert isinstance(runner.max_failures, int) and runner.max_failures >= 0
    for name in methods:
        assert inspect.signature(getattr(type(runner), name)).parameters.keys() == \
            inspect.signature(getattr(Runner, name)).parameters.keys(), name


class FakeRunner:
    """A :class:`Runner` whose runs train nothing: a teacher "trains" by publishing an empty directory,
    a student (once its teacher is published) by publishing its result.json, each claimed through the
    registry as a worker would."""

    poll_s = 0.01
    max_failures = 0

    def __init__(self, combined: bool):
        self._combined = combined
        self.started: list[tuple[WorkerConfig, int, bool]] = []  # (config, workers, a job was ready)

    def lost_node(self, error: BaseException) -> bool:
        return isinstance(error, NodeLost)

    def combined(self) -> bool:
        return self._combined

    def demand(self, phase: RunPhase) -> dict[str, float]:
        return {"CPU": 1.0}

    def workers(self, phase: RunPhase, units: int) -> int:
        return units

    def max_units(self, phase: RunPhase) -> int:
        return 2

    def available(self) -> dict[str, float]:
        return {"CPU": 8.0}

    def fits(self, per_unit: dict[str, float]) -> bool:
        return True

    def start(self, config: WorkerConfig, workers: int) -> list[dict]:
        store, registry = Store(config.store), config.registry.for_owner(config.run)

        def ready(job: StudentJob) -> bool:
            return job.teacher_rel is None or store.is_complete(job.teacher_rel)

        self.started.append((config, workers, any(ready(j) for j in config.jobs)))
        registry.started(config.run)
        trained = []
        for spec in config.specs if config.phase.trains_teachers else ():
            if registry.claim(spec.key) == "mine":
                self._publish(store, registry, spec, None)
                trained.append({"key": spec.key})
        if config.phase.trains_students:
            # as a student worker does: wait while a teacher is being trained, then take what is ready
            while any(state == "running" for state, _ in registry.states([s.key for s in config.specs]).values()):
                time.sleep(0.01)
            for job in config.jobs:
                if ready(job) and registry.claim(job.key) == "mine":
                    self._publish(store, registry, job, {"method": job.method, "domain": job.domain,
                                                         "trained_by": config.source})
        return trained

    @staticmethod
    def _publish(store: Store, registry, item, result: dict | None) -> None:
        with tempfile.TemporaryDirectory() as out:
            if result is not None:
                with open(f"{out}/result.json", "w") as f:
                    json.dump(result, f)
            store.publish_dir(out, item.rel)
        registry.finish(item.key)


@pytest.mark.parametrize("combined", [False, True], ids=["teachers-then-students", "both"])
def test_runs_get_the_trials_typed_config_and_students_wait_for_their_teachers(tmp_path, combined):
    cfg = _cfg()
    specs, jobs = plan(cfg, ["alpha", "beta"])  # 1 meta + 2 single teachers, 4 jobs
    runner, store = FakeRunner(combined), Store(str(tmp_path))
    source = {"trial_id": "t", "part": "cfg-t"}
    schedule = TrialSchedule(cfg, specs, jobs, {0: "data/d0"}, store, LocalRegistry(), runner, source, "t", _quiet)
    students, trained = schedule.run()

    assert [(r["method"], r["domain"]) for r in students] == [(j.method, j.domain) for j in jobs]
    assert sorted(t["key"] for t in trained) == sorted(s.key for s in specs)  # each teacher once
    assert all(store.is_complete(x.rel) for x in [*specs, *jobs])
    for config, _, _ in runner.started:
        # the experiment itself, not a dict of it; the trial's teachers and jobs as typed specs
        assert config.experiment is cfg and config.data == {0: "data/d0"} and config.source == source
        assert config.specs == tuple(specs) and config.jobs == tuple(jobs) and config.runtime == "local"
        assert config.run.startswith(f"t-{config.phase}-")
    phases = [c.phase for c, _, _ in runner.started]
    if combined:  # the teacher runs' workers go on to the students: no run of students alone
        assert set(phases) == {RunPhase.BOTH}
    else:  # a students run starts only when one of its jobs can start
        assert phases[0] is RunPhase.TEACHERS and RunPhase.STUDENTS in phases and RunPhase.BOTH not in phases
        assert all(ready for c, _, ready in runner.started if c.phase is RunPhase.STUDENTS)


# ----------------------------------------------------------------------------- runs that fail


class NodeLost(RuntimeError):
    """What the fake runner's :meth:`FakeRunner.lost_node` takes for a node that died."""


class FailingRunner(FakeRunner):
    """The first ``len(errors)`` launches of run ``t-teachers-0`` claim a teacher, then raise the next
    of ``errors``, as a run whose worker died in the middle of it (its lease renewals stop too)."""

    def __init__(self, errors: list[BaseException], max_failures: int = 0):
        super().__init__(combined=False)
        self.errors, self.max_failures = list(errors), max_failures
        self.interrupted: list[str] = []  # the teacher each failed launch held

    def available(self) -> dict[str, float]:
        return {"CPU": 1.0}  # room for one run: no other run takes the teacher a failed launch gave back

    def start(self, config: WorkerConfig, workers: int) -> list[dict]:
        if config.run == "t-teachers-0" and self.errors:
            self.started.append((config, workers, False))
            registry = config.registry.for_owner(config.run)
            self.interrupted.append(next(s.key for s in config.specs if registry.claim(s.key) == "mine"))
            registry.close()
            raise self.errors.pop(0)
        return super().start(config, workers)


def _schedule(tmp_path, runner):
    cfg = _cfg()
    specs, jobs = plan(cfg, ["alpha", "beta"])
    registry, store = LocalRegistry(), Store(str(tmp_path))
    lines: list[str] = []
    schedule = TrialSchedule(cfg, specs, jobs, {0: "data/d0"}, store, registry, runner, {"trial_id": "t", "part": "p"},
                             "t", lines.append)
    return schedule, specs, registry, store, lines


def test_a_run_that_lost_its_node_gives_back_its_claim_and_starts_again_under_its_name(tmp_path):
    # two lost nodes in a row, and no failure budget at all: a lost node is not the run's fault
    runner = FailingRunner([NodeLost("node died"), NodeLost("node died again")], max_failures=0)
    schedule, specs, registry, store, lines = _schedule(tmp_path, runner)
    students, trained = schedule.run()

    assert [c.attempt for c, _, _ in runner.started if c.run == "t-teachers-0"] == [1, 2, 3]
    failed = read_events(store, RUN_FAILED)
    assert [(e["run"], e["attempt"], e["lost_node"], e["retried"]) for e in failed] == \
        [("t-teachers-0", 1, True, True), ("t-teachers-0", 2, True, True)]
    assert [e["interrupted"] for e in failed] == [[k] for k in runner.interrupted]
    assert all(e["trial_id"] == "t" for e in failed)
    assert "NodeLost: node died" in failed[0]["error"]
    # nothing lost, nothing twice: every teacher published and trained once, every job has its result
    assert sorted(t["key"] for t in trained) == sorted(s.key for s in specs)
    assert len(students) == len(schedule.jobs) and all(store.is_complete(s.rel) for s in specs)
    assert any("t-teachers-0 lost a node (attempt 1" in line and "starting it again" in line for line in lines)
    assert any("starting t-teachers-0 again (attempt 3)" in line for line in lines)
    # the console's line comes from the registry's log
    assert [r["run"] for r in registry.progress()[0] if r.get("type") == RUN_FAILED] == ["t-teachers-0"] * 2


def test_a_run_that_failed_on_its_own_is_started_again_within_max_failures(tmp_path):
    runner = FailingRunner([ValueError("a bad batch")], max_failures=1)
    schedule, specs, _, store, _ = _schedule(tmp_path, runner)
    _, trained = schedule.run()
    assert sorted(t["key"] for t in trained) == sorted(s.key for s in specs)
    (failed,) = read_events(store, RUN_FAILED)
    assert not failed["lost_node"] and failed["retried"] and failed["attempt"] == 1


def test_a_run_that_failed_more_than_max_failures_fails_the_trial_and_gives_back_its_claims(tmp_path):
    runner = FailingRunner([ValueError("a bad batch"), ValueError("the same bad batch")], max_failures=1)
    schedule, specs, registry, store, lines = _schedule(tmp_path, runner)
    with pytest.raises(ValueError, match="the same bad batch"):
        schedule.run()
    assert [(e["attempt"], e["retried"]) for e in read_events(store, RUN_FAILED)] == [(1, True), (2, False)]
    key = runner.interrupted[-1]
    assert registry.states([key])[key] == ("missing", None)  # whoever comes next takes it
    assert "giving up" in lines[-1]


def test_lost_nodes_are_bounded_too(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule_module, "LOST_NODE_RETRIES", 2)
    runner = FailingRunner([NodeLost("1"), NodeLost("2"), NodeLost("3")], max_failures=5)
    schedule, _, _, store, _ = _schedule(tmp_path, runner)
    with pytest.raises(NodeLost, match="3"):
        schedule.run()
    assert [e["retried"] for e in read_events(store, RUN_FAILED)] == [True, True, False]


# ----------------------------------------------------------------------------- trials sharing a store


def _trial(cfg, root, registry, trial_id, rows: list):
    """One in-process 'trial': its rows are rewritten after every finished student, as in a sweep."""

    def on_students(new, so_far):
        rows[:] = result_rows(cfg, "sched", trial_id, so_far, {"gamma2": cfg.distill.gamma2})

    return run_experiment(cfg, Store(str(root)), registry, LocalRunner(), _quiet, on_students=on_students,
                          source={"trial_id": trial_id, "part": f"cfg-{trial_id}"}, run_prefix=trial_id)


@pytest.fixture(scope="module")
def gamma2_sweep(tmp_path_factory):
    """Two gamma2 'trials' racing in two threads on one store and one registry."""
    root = tmp_path_factory.mktemp("share")
    registry = LocalRegistry()
    rows = {"t0": [], "t1": []}
    outs, errors = {}, []

    def go(trial_id, gamma2):
        try:
            outs[trial_id] = _trial(_cfg(gamma2=gamma2), root, registry, trial_id, rows[trial_id])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=a) for a in (("t0", 0.0), ("t1", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    df = pd.DataFrame(rows["t0"] + rows["t1"])
    return root, outs, df


def test_racing_trials_train_each_teacher_and_each_student_job_once(gamma2_sweep):
    root, outs, df = gamma2_sweep
    store = Store(str(root))
    # 1 meta-teacher + 2 single teachers, shared; 2 x 2 metakd students + 2 kd_single students
    assert count_teacher_trainings(store) == 3
    assert sum(len(o["teachers_trained"]) for o in outs.values()) == 3
    students = read_events(store, STUDENT)
    assert len(students) == count_student_trainings(store) == 6
    assert len({e["key"] for e in students}) == 6
    kd = [e for e in students if e["method"] == "kd_single"]
    assert sorted(e["domain"] for e in kd) == ["alpha", "beta"]  # once per (domain, seed)
    for e in students + read_events(store, TEACHER):
        assert e["end"] >= e["start"] > 0 and e["worker"] and e["device"] == "cpu" and e["key"]
    # each student starts after its teacher was published
    published = {e["key"]: e["end"] for e in read_events(store, TEACHER)}
    assert all(e["start"] >= published[e["teacher_key"]] for e in students)


def test_reused_rows_name_their_source_and_the_table_keeps_one_row_per_trial(gamma2_sweep):
    _, outs, df = gamma2_sweep
    # one row per trial x seed x method x domain x split, as without reuse
    assert len(df) == 2 * 1 * 2 * 2 * 2
    assert not df.duplicated(["trial_id", "seed", "method", "domain", "split"]).any()
    meta = df[df["method"] == "metakd"]
    assert meta["reused_from"].isna().all() and meta["student_key"].nunique() == 4
    kd = df[df["method"] == "kd_single"]
    assert kd["student_key"].nunique() == 2
    for (domain, split), g in kd.groupby(["domain", "split"]):
        # the same student in both trials: the trial that did not train it names the one that did
        assert len(g) == 2 and g["accuracy"].nunique() == 1 and g["student_key"].nunique() == 1
        assert g["reused_from"].isna().sum() == 1
        (source,) = g["reused_from"].dropna()
        assert g.loc[g["reused_from"].isna(), "trial_id"].item() == source




def test_analyses_count_a_shared_student_once_and_keep_the_means(gamma2_sweep, tmp_path):
    _, _, df = gamma2_sweep
    results.write_part(str(tmp_path), df.to_dict("records"), "all")
    table = results.load(str(tmp_path))
    # every student its own accuracy (its copies keep it): a student counted twice moves its cell's mean
    keys = sorted(table["student_key"].unique())
    assert len(keys) == 6  # 2 x 2 metakd (one per trial) + 2 kd_single (shared by both trials)
    table["accuracy"] = table["student_key"].map({k: 0.5 + i / 20 for i, k in enumerate(keys)})
    long = analysis.main_table(table, "test")
    test = table[table["split"] == "test"]
    # by hand: each trained student once, averaged per (method, domain) (one seed)
    distinct = test.drop_duplicates("student_key")
    expected = distinct.groupby(["method", "domain"])["accuracy"].mean()
    got = long[long["domain"] != analysis.AVERAGE].set_index(["method", "domain"])["mean"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    # the same means as a table where every trial had trained its own identical kd_single copy
    naive = test.groupby(["method", "domain"])["accuracy"].mean()
    pd.testing.assert_series_equal(got.sort_index(), naive.sort_index(), check_names=False)
    # an unbalanced table (one metakd student listed by 4 trials, the other of its cell by 1) is not
    # weighted by trials
    shared = table[(table["method"] == "metakd") & (table["domain"] == "alpha") & (table["trial_id"] == "t0")]
    assert len(shared) == 2  # dev and test
    more = [shared.assign(trial_id=f"t{i}", reused_from="t0") for i in (2, 3, 4)]
    again = analysis.main_table(pd.concat([table, *more], ignore_index=True), "test")
    pd.testing.assert_frame_equal(again, long)
