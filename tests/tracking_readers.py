"""Read back what the experiment trackers wrote, with their own readers: MLflow's client API on its
tracking store, TensorBoard's event accumulator, and a W&B offline run directory's transaction log."""

from __future__ import annotations

import glob
import json
import os


def mlflow_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {tracking_uri}"
    return client.search_runs([exp.experiment_id], max_results=1000)


def mlflow_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def tensorboard_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the event files directly in ``directory`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_tags(directory: str) -> dict[str, str]:
    """The ``training`` text (``key: value`` lines) of a training's event files."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    (event,) = acc.Tensors("training/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    return dict(line.strip().split(": ", 1) for line in text.splitlines() if line.strip())


def wandb_offline_runs(directory: str) -> list[dict]:
    """Each ``<directory>/wandb/offline-run-*``: name, group, job_type, config and history
    ([{key: value}, with ``_step``]) from its ``run-<id>.wandb`` transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "wandb", "offline-run-*", "run-*.wandb"))):
        run = {"path": path, "config": {}, "history": [], "summary": {}}
        for data in _leveldb_log_records(path):
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                row["_step"] = record.history.step.num
                run["history"].append(row)
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
        runs.append(run)
    return runs


def _leveldb_log_records(path: str):
    """The records of W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks of chunks: CRC32C (4), length (2, little-endian), type (1: full, 2: first,
    3: middle, 4: last), data)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""
