"""Where a training loop runs: in this process, or as a Ray Train worker.

The loops call the same five things either way (device, prepare_model, prepare_loader,
report, restored checkpoint), so one loop serves ``metakd run`` in-process, the tests,
and multi-worker DDP inside a sweep.
"""

from __future__ import annotations

import tempfile

import torch


class LocalRuntime:
    """One process, no Ray: reports are printed, nothing is restored."""

    rank = 0
    world_size = 1
    epoch_checkpoints = False  # report a resumable checkpoint after every epoch

    def __init__(self, device: str = "auto", log=print):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.log = log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        pass

    def restored_dir(self) -> str | None:
        return None


class RayRuntime(LocalRuntime):
    """Inside ``TorchTrainer``: DDP model, sharded loaders, ``ray.train.report`` with checkpoints."""

    def __init__(self, epoch_checkpoints: bool = True, log=print):
        import logging

        import ray.train
        import ray.train.torch

        # one INFO line per checkpoint and per report drowns the progress lines
        logging.getLogger("ray.train").setLevel(logging.WARNING)

        self._train = ray.train
        self._torch = ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self._restored = None
        self.epoch_checkpoints = epoch_checkpoints

    def prepare_model(self, model):
        # find_unused_parameters: stage 2 of distillation and gamma1 = 0 leave heads without gradients
        return self._torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader):
        return self._torch.prepare_data_loader(loader, add_dist_sampler=True, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir)
        self._train.report(metrics, checkpoint=checkpoint)

    def restored_dir(self) -> str | None:
        if self._restored is None:
            ckpt = self._train.get_checkpoint()
            if ckpt is None:
                return None
            self._restored = ckpt.to_directory(tempfile.mkdtemp(prefix="metakd-restore-"))
        return self._restored


def make_runtime(kind: str, device: str = "auto", epoch_checkpoints: bool = True) -> LocalRuntime:
    if kind == "ray":
        return RayRuntime(epoch_checkpoints)
    return LocalRuntime(device)


def unwrap(model):
    """The module inside a DDP wrapper (for evaluation and saving)."""
    return model.module if hasattr(model, "module") else model
