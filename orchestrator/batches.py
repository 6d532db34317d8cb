"""The batch order of a run, the same in every process that computes it.

Every chunk actor rebuilds the task from its seed and walks the same seeded
permutations, so no data crosses the wire and any actor can jump to any step
(to resume from a checkpoint) without replaying the ones before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cortex_service.runtime import Batch
from orchestrator.tasks.base import SequenceData, TaskData


class BatchStream:
    """Batch ``step`` of a run: epoch ``step // batches_per_epoch``, shuffled by seed.

    The permutations come from one generator seeded with ``seed``, drawn epoch by
    epoch, exactly as :meth:`orchestrator.trainer.Trainer.train_epoch` draws them.
    """

    def __init__(
        self, task: TaskData, batch_size: int, seed: int, context: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        self.task = task
        self.batch_size = batch_size
        self.context = context
        self.n_labels = int(task.train.labels.max()) + 1
        self._generator = torch.Generator().manual_seed(seed)
        self._orders: list[torch.Tensor] = []

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.task.train) // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The shuffled order of training sequences in ``epoch``."""
        while len(self._orders) <= epoch:
            self._orders.append(
                torch.randperm(len(self.task.train), generator=self._generator)
            )
        return self._orders[epoch]

    def sequences(self, step: int) -> SequenceData:
        epoch, position = divmod(step, self.batches_per_epoch)
        start = position * self.batch_size
        return self.task.train.subset(
            self.order(epoch)[start : start + self.batch_size]
        )

    def batch(self, step: int) -> Batch:
        data = self.sequences(step)
        context = (
            F.one_hot(data.labels, self.n_labels).float() if self.context else None
        )
        return Batch(data.inputs, data.targets, data.mask, context)


class BatchSource:
    """A picklable recipe for a run's batches, rebuilt inside each actor.

    Calling it loads the task from its seed and returns ``step -> Batch``.
    """

    def __init__(
        self,
        task: str,
        seed: int,
        batch_size: int,
        data_dir: str | None = None,
        n_train: int | None = None,
        context: bool = False,
    ) -> None:
        self.task = task
        self.seed = seed
        self.batch_size = batch_size
        self.data_dir = data_dir
        self.n_train = n_train
        self.context = context

    def __call__(self):
        from orchestrator.tasks.registry import load_task

        task = load_task(
            self.task, seed=self.seed, data_dir=self.data_dir, n_train=self.n_train
        )
        return BatchStream(task, self.batch_size, self.seed, self.context).batch
