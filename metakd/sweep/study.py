"""The Optuna study of a searched sweep (``search.algorithm`` optuna or random), kept where it
outlives the sweep's driver: resumed with the sweep, extended by raising ``search.num_samples``,
opened by ``optuna-dashboard`` and read by the search summary (``metakd.report.analysis``).

    <storage>/<name>/study.journal   Optuna's JournalStorage, file backend (a local or NFS storage)
    <storage>/<name>/study.json      {"name": the study's name, "storage": its URL or "study.journal"}

``search.study_storage`` (sqlite:///..., postgresql://..., mysql://..., or a journal file path)
puts the study elsewhere. A sweep on an object store (s3://, gs://) without ``study_storage``
has no file it could lock: its study lives in Tune's searcher state only, so resuming the sweep
goes on with it, but it cannot be extended or opened by optuna-dashboard (an extension is
refused, naming ``study_storage``).

The study is named ``<sweep>-<UTC time the sweep was first stored>`` (``sweep_config.json``): the
same across resumes and extensions, a new one after ``--restart``, so one database keeps the
runs apart.

    optuna-dashboard <storage>/<name>/study.journal
"""

from __future__ import annotations

import os

from ..config import ConfigError, ExperimentConfig
from ..storage import Store, is_uri

JOURNAL = "study.journal"
RECORD = "study.json"


def storage_url(cfg: ExperimentConfig, root: str) -> str | None:
    """Where the study of the sweep at ``root`` lives: ``search.study_storage``, else the journal
    in the sweep's directory; None for a grid (no study) or an object store without ``study_storage``."""
    s = cfg.search
    if s.algorithm == "grid":
        return None
    if s.study_storage:
        return s.study_storage if "://" in s.study_storage else os.path.abspath(os.path.expanduser(s.study_storage))
    return None if is_uri(root) else f"{root}/{JOURNAL}"


def open_storage(url: str):
    """An Optuna storage for ``url``: a database URL, or the path of a journal file."""
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def open_study(cfg: ExperimentConfig, store: Store, name: str):
    """(storage, ``name``) of the sweep's study (named by ``metakd.sweep.identity.study_name``),
    recorded in ``study.json``; (None, None) when it has no persistent study (a grid, or an object
    store without ``search.study_storage``)."""
    url = storage_url(cfg, store.root)
    if url is None:
        return None, None
    default = store.local_root is not None and url == f"{store.root}/{JOURNAL}"
    store.write_json(RECORD, {"name": name, "storage": JOURNAL if default else without_password(url)})
    return open_storage(url), name


def without_password(url: str) -> str:
    """``url`` without a database password, to be printed or stored: readers connect with
    the database's own credentials (PGPASSWORD, ~/.pgpass, ~/.my.cnf)."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url)._replace(password=None).render_as_string(hide_password=False)  # a NamedTuple


def trials_in(storage, name: str) -> list:
    """The study's trials (FrozenTrial), none when it does not exist yet."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def check_extendable(cfg: ExperimentConfig, store: Store, sweep: str, name: str) -> None:
    """Refuse to extend a sweep whose study cannot take more trials: one kept in Tune's state only
    (object store without ``search.study_storage``, or a sweep started before studies were kept),
    or one with unfinished trials (an interrupted run: resume it first)."""
    import optuna

    url = storage_url(cfg, store.root)
    if url is None:
        raise ConfigError(
            f"sweep '{sweep}' at {store.root}: raising search.num_samples extends its Optuna study, but on an "
            f"object store the study lives only in Tune's searcher state; set search.study_storage "
            f"(sqlite:///<path on the driver's machine> or postgresql://...) before the first run to make it "
            f"extendable, or start anew with --restart")
    if store.exists("tune") and not store.exists(RECORD):
        raise ConfigError(
            f"sweep '{sweep}' at {store.root} predates persistent Optuna studies: its study lives in Tune's searcher "
            f"state only, so it resumes but cannot be extended; start anew with --restart (teachers and students "
            f"in the cache are reused)")
    trials = trials_in(open_storage(url), name)
    open_trials = [t.number for t in trials if t.state in (optuna.trial.TrialState.RUNNING,
                                                           optuna.trial.TrialState.WAITING)]
    if open_trials:
        raise ConfigError(
            f"sweep '{sweep}': its study has unfinished trials {open_trials} (an interrupted run); resume it with "
            f"the stored search.num_samples first, then raise num_samples to extend it")


def load_study(root: str):
    """The study of the sweep directory ``root`` (``study.json``), or None when it has none."""
    import optuna

    store = Store(root)
    if not store.exists(RECORD):
        return None
    record = store.read_json(RECORD)
    url = record["storage"]
    if url == JOURNAL:
        if store.local_root is None:
            return None
        url = str(store.local_root / JOURNAL)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=record["name"], storage=open_storage(url))
    finally:
        optuna.logging.set_verbosity(verbosity)
