"""Where a training loop runs: in this process, or as a Ray Train worker.

The loops call the same few things either way (device, prepare_model, distribute,
train_loader / eval_loader, agree, report, restored checkpoint), so one loop serves
``metakd run`` in-process, the tests, and multi-worker DDP inside a sweep (or any
``torch.distributed`` process group: rank and world size are all a runtime needs).
"""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..loader import make_loader, per_worker_batch
from .precision import use_tf32


class LocalRuntime:
    """One process, no Ray: reports are printed, nothing is restored."""

    rank = 0
    world_size = 1
    epoch_checkpoints = False  # report a resumable checkpoint after every epoch
    tracker = None  # the experiment trackers of the training under way (metakd.tracking.track_training sets it)
    # a checkpoint of the training under way that another run left when it lost it (a node died):
    # train_stage resumes from it when it is further on than the run's own (metakd.jobs.workers sets it)
    resume_dir: str | None = None
    # whether another owner has taken over the training under way (this owner's lease ran out): train_stage
    # then stops it (metakd.jobs.workers sets it on rank 0 around each training; None: never)
    superseded = None

    def __init__(self, device: str = "auto", log=print, gpu_share: float = 1.0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.log = log
        # the fraction of its GPU this worker was given (search.resources.student_gpus_per_worker:
        # 0.25 = four workers on one GPU); 1 for a whole GPU or a CPU. Sizes the teacher cache.
        self.gpu_share = gpu_share
        use_tf32(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model):
        return model.to(self.device)

    def distribute(self, module):
        """DDP over ``module`` when there are several workers (the training loop passes its loss)."""
        if self.world_size == 1:
            return module
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None  # one GPU per rank
        # find_unused_parameters: stage 2 of distillation, gamma1 = 0 and the CE teachers leave heads without gradients
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def train_loader(self, split, global_batch: int, seed: int, field: str, group_by_length: bool = False):
        """This worker's share of the seeded global batches of ``global_batch`` examples,
        reshuffled every epoch (:class:`metakd.loader.ShardedBatchSampler`). ``field`` names
        the YAML setting in the error raised when the batch does not split over the workers."""
        per_worker_batch(global_batch, self.world_size, field)
        return make_loader(split, global_batch, True, seed, self.rank, self.world_size, pin_memory=self.pin_memory,
                           group_by_length=group_by_length)

    def eval_loader(self, split, batch_size: int = 64, trim: bool = True):
        """All of ``split`` in order, on every worker."""
        return make_loader(split, batch_size, False, pin_memory=self.pin_memory, trim=trim)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (for decisions that lead into a collective call)."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([int(flag)], device=self.device)
            dist.broadcast(t, 0)
            return bool(t.item())
        return flag

    def stop_requested(self) -> bool:
        """Rank 0's ``superseded()`` on every rank (with several ranks a collective: every rank calls it)."""
        return self.agree(bool(self.is_main and self.superseded is not None and self.superseded()))

    def any_rank(self, flag: torch.Tensor) -> bool:
        """Whether the one-element tensor ``flag`` (on this rank's device) is true on some rank: one
        all-reduce that every rank must reach, then one host read."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = flag.reshape(1).to(torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return bool(flag)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        pass

    def track(self, point: dict) -> None:
        """One finished epoch (a ``train_stage`` curve point) to the experiment trackers, as it happens."""
        if self.tracker is not None and self.is_main:
            self.tracker.epoch(point)

    def restored_dir(self) -> str | None:
        return None


class RayRuntime(LocalRuntime):
    """Inside ``TorchTrainer`` (which set up the process group): ``ray.train.report`` with checkpoints."""

    def __init__(self, epoch_checkpoints: bool = True, log=print, gpu_share: float = 1.0):
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
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives (agree, DDP) run on this worker's GPU
        self.gpu_share = gpu_share
        use_tf32(self.device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self._restored = None
        self.epoch_checkpoints = epoch_checkpoints

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


def make_runtime(kind: str, device: str = "auto", epoch_checkpoints: bool = True,
                 gpu_share: float = 1.0) -> LocalRuntime:
    if kind == "ray":
        return RayRuntime(epoch_checkpoints, gpu_share=gpu_share)
    return LocalRuntime(device, gpu_share=gpu_share)


def unwrap(model):
    """The module inside a DDP wrapper (for evaluation and saving); the model itself otherwise."""
    return model.module if hasattr(model, "module") else model
