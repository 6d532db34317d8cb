"""The in-process trainer: all chunks and the cerebellum in one process.

Chunks run one after another inside each window and exchange activity and
observed feedback as plain tensors (spatially locked: exact backprop across
chunks); time is cut into windows, and at each window end the state microzones
predict the feedback of the future. The distributed trainer runs the same
:class:`~cortex_service.learning.ChunkLearner` and microzones in separate actors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cerebellum_service.learning import (
    ActivityKey,
    FeedbackPredictor,
    LocalCerebellum,
    Observation,
    Query,
)
from cortex_service.learning import ChunkLearner, WindowPass
from cortex_service.network import (
    CorticalChunk,
    build_chunks,
    flatten_state,
    unflatten_state,
    window_bounds,
)
from cortex_service.runtime import at_window_end, state_zone
from orchestrator import measures
from orchestrator.batches import BatchStream
from orchestrator.config import TrainConfig
from orchestrator.tasks.base import SequenceData, TaskData, sequence_loss
from orchestrator.zones import build_microzones, context_size, zone_specs

logger = logging.getLogger(__name__)


def build_cerebellum(
    config: TrainConfig, chunks: list[CorticalChunk], context_size: int
) -> LocalCerebellum:
    """One state microzone per chunk, seeded from the run's seed."""
    specs = zone_specs(config, chunks, "locked", False, context_size)
    return LocalCerebellum(build_microzones(specs), lr=config.cerebellum_lr)


@dataclass
class BatchResult:
    loss: float
    windows: int


class Trainer:
    """Trains one cortical network (cut into chunks) on one task.

    Args:
        config: the run's configuration.
        task: the task's data.
    """

    def __init__(self, config: TrainConfig, task: TaskData) -> None:
        torch.set_num_threads(config.threads)
        self.config = config
        self.task = task
        self.chunks = build_chunks(
            task.input_size,
            config.hidden_size,
            task.output_size,
            config.chunks,
            config.layers_per_chunk,
            config.dropout,
            config.seed,
        )
        self.learners = [
            ChunkLearner(c, config.lr, config.clip or None) for c in self.chunks
        ]
        self.n_labels = int(task.train.labels.max()) + 1
        self.context_size = context_size(config, self.n_labels, task.seq_len)
        self.cerebellum = (
            build_cerebellum(config, self.chunks, self.context_size)
            if config.uses_cerebellum
            else None
        )
        # What the cortex asks for predictions; a lesion of the cerebellum sets it
        # to None while the cerebellum object itself stays for inspection.
        self.predictor: FeedbackPredictor | None = self.cerebellum
        self.truncation = config.effective_truncation(task.seq_len)
        self.batches = BatchStream(task, config.batch_size, config.seed, config.context)
        self.steps = 0
        self.epoch = 0

    # One batch -------------------------------------------------------------------

    def context_for(self, batch: SequenceData) -> torch.Tensor | None:
        """The label part of the state microzones' context (``--context``)."""
        if not self.config.context or self.config.context_zones == "output":
            return None
        return F.one_hot(batch.labels, self.n_labels).float()

    def run_batch(
        self,
        batch: SequenceData,
        predictor: FeedbackPredictor | None = None,
        step: bool = True,
    ) -> BatchResult:
        """Forward and backward over every window of ``batch``; update if ``step``.

        Args:
            batch: the sequences.
            predictor: where predicted feedback comes from (default: the trainer's
                own, ``None`` after a cerebellar lesion).
            step: apply updates (False leaves the summed gradients in ``.grad``,
                which the exactness tests compare with full BPTT).
        """
        predictor = self.predictor if predictor is None else predictor
        config = self.config
        size = len(batch)
        normaliser = batch.mask.sum().clamp_min(1)
        context = self.context_for(batch)
        # The cerebellum works in feedback per example (batch-mean gradients times
        # the batch size), so what it learns does not depend on the batch size.
        unit = float(size)
        states = [chunk.initial_state(size) for chunk in self.chunks]
        bounds = list(window_bounds(self.task.seq_len, self.truncation))
        total_loss = 0.0

        for window, (start, stop) in enumerate(bounds):
            passes = self._forward_window(batch.inputs[:, start:stop], states)
            states = [tuple(s.detach() for s in p.state_end) for p in passes]
            loss = sequence_loss(
                passes[-1].outputs,
                batch.targets[:, start:stop],
                batch.mask[:, start:stop],
                self.task.kind,
                normaliser,
            )
            total_loss += float(loss.detach())

            final = window == len(bounds) - 1
            state_feedback = (
                [None] * len(self.chunks)
                if predictor is None or final
                else self._predict_state_feedback(
                    predictor, passes, window, stop, context, unit
                )
            )
            observations = self._backward_window(
                passes, loss, state_feedback, window, unit
            )
            if predictor is not None and observations:
                predictor.observe(observations)
            if step and config.update == "window":
                self._apply_updates(predictor)

        if step and config.update == "sequence":
            self._apply_updates(predictor)
        return BatchResult(total_loss, len(bounds))

    def _forward_window(self, inputs: torch.Tensor, states: list) -> list[WindowPass]:
        passes = []
        for index, learner in enumerate(self.learners):
            window = learner.forward(inputs, states[index], input_feedback=index > 0)
            passes.append(window)
            inputs = window.hidden
        return passes

    def _predict_state_feedback(
        self,
        predictor: FeedbackPredictor,
        passes: list[WindowPass],
        window: int,
        stop: int,
        context: torch.Tensor | None,
        unit: float,
    ) -> list:
        if self.config.time_context and self.config.context_zones != "output":
            size = passes[0].state_end[0].shape[1]
            context = at_window_end(context, size, stop, self.task.seq_len)
        queries = [
            Query(
                state_zone(index),
                ActivityKey(self.steps, window, index),
                flatten_state(p.state_end).detach(),
                context,
            )
            for index, p in enumerate(passes)
        ]
        feedback = []
        for chunk, prediction in zip(self.chunks, predictor.predict(queries)):
            if prediction is None:
                feedback.append(None)
                continue
            scaled = prediction * (self.config.feedback_scale / unit)
            feedback.append(
                unflatten_state(scaled, chunk.num_layers, chunk.hidden_size)
            )
        return feedback

    def _backward_window(
        self,
        passes: list[WindowPass],
        loss: torch.Tensor,
        state_feedback: list,
        window: int,
        unit: float,
    ) -> list[Observation]:
        observations = []
        output_feedback = None
        for index in reversed(range(len(passes))):
            input_grad, start_feedback = self.learners[index].backward(
                passes[index],
                loss=loss if index == len(passes) - 1 else None,
                output_feedback=output_feedback,
                state_feedback=state_feedback[index],
            )
            output_feedback = input_grad
            if window > 0:
                # Observed feedback at this window's start answers the prediction
                # made at the previous window's end.
                key = ActivityKey(self.steps, window - 1, index)
                observations.append(
                    Observation(state_zone(index), key, start_feedback * unit)
                )
        return observations

    def _apply_updates(self, predictor: FeedbackPredictor | None) -> None:
        for learner in self.learners:
            learner.step()
        if predictor is not None:
            predictor.update()

    # Epochs and evaluation -------------------------------------------------------

    def apply_lesions(self, epoch: int) -> None:
        for lesion in self.config.lesions:
            if lesion.epoch != epoch:
                continue
            logger.info("epoch %d: %s lesion", epoch, lesion.kind)
            if lesion.kind == "cerebellum":
                self.predictor = None
            elif lesion.kind == "olive" and self.cerebellum is not None:
                self.cerebellum.frozen = True

    def train_epoch(self) -> float:
        """One pass over the training set in the run's seeded order; mean loss."""
        self.apply_lesions(self.epoch)
        for chunk in self.chunks:
            chunk.train()
        losses = []
        for _ in range(self.batches.batches_per_epoch):
            losses.append(self.run_batch(self.batches.sequences(self.steps)).loss)
            self.steps += 1
        self.epoch += 1
        return sum(losses) / len(losses)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(N, S, I)`` inputs to ``(N, S, O)`` outputs, in evaluation mode."""
        for chunk in self.chunks:
            chunk.eval()
        hidden = inputs
        for chunk in self.chunks:
            hidden, _ = chunk(hidden, chunk.initial_state(inputs.shape[0]))
        return self.chunks[-1].read_out(hidden)

    def evaluate(self, split: SequenceData) -> dict[str, Any]:
        """Loss and task metric (and ataxia measures for drawing tasks)."""
        outputs = self.predict(split.inputs)
        loss = float(
            sequence_loss(
                outputs, split.targets, split.mask, self.task.kind, split.mask.sum()
            )
        )
        result: dict[str, Any] = {"loss": loss}
        if self.task.kind == "classification":
            picked = outputs[split.mask]
            result["metric"] = measures.accuracy(picked, split.targets[split.mask])
            result["metric_name"] = "accuracy"
        else:
            ataxia = measures.ataxia(outputs, split.targets)
            result.update(ataxia)
            result["metric"] = ataxia["dysmetria"]
            result["metric_name"] = "dysmetria"
        if self.task.evaluator is not None:
            measures_of_task = dict(self.task.evaluator(self.chunks, split))
            result["metric"] = measures_of_task.pop("metric", result["metric"])
            result["metric_name"] = measures_of_task.pop(
                "metric_name", result["metric_name"]
            )
            result["task_metrics"] = measures_of_task
        return result

    def cerebellum_loss(self) -> float | None:
        if self.cerebellum is None:
            return None
        losses = [s.last_loss for s in self.cerebellum.stats.values()]
        return sum(losses) / len(losses)

    def fit(
        self,
        out_dir: str | Path | None = None,
        progress: bool = True,
        on_eval: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train for ``config.epochs`` epochs; write ``curve.jsonl``/``summary.json``.

        Returns the summary record (DESIGN.md's contract).
        """
        from tqdm.auto import tqdm

        config = self.config
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            curve_file = (out / "curve.jsonl").open("w")
        started = time.perf_counter()
        epoch_seconds = []
        train_loss = float("nan")
        curve: list[dict[str, Any]] = []

        bar = tqdm(
            range(config.epochs),
            desc=f"{config.task}/{config.model}",
            disable=not progress,
            unit="epoch",
        )
        try:
            for epoch in bar:
                tic = time.perf_counter()
                train_loss = self.train_epoch()
                epoch_seconds.append(time.perf_counter() - tic)
                if (epoch + 1) % config.eval_every and epoch + 1 != config.epochs:
                    continue
                record = self._curve_record(epoch, train_loss, started)
                curve.append(record)
                if out is not None:
                    curve_file.write(json.dumps(record) + "\n")
                    curve_file.flush()
                if on_eval is not None:
                    on_eval(record)
                bar.set_postfix(
                    loss=f"{train_loss:.4f}", val=f"{record['validation_loss']:.4f}"
                )
        finally:
            if out is not None:
                curve_file.close()

        summary = self._summary(
            train_loss, time.perf_counter() - started, epoch_seconds
        )
        if out is not None:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.task.drawing:
                trajectories = example_trajectories(self, self.task.validation)
                (out / "trajectories.json").write_text(json.dumps(trajectories))
        return summary

    def _curve_record(self, epoch: int, train_loss: float, started: float) -> dict:
        validation = self.evaluate(self.task.validation)
        record = {
            "step": self.steps,
            "epoch": epoch + 1,
            "wall_seconds": time.perf_counter() - started,
            "train_loss": train_loss,
            **curve_fields(validation),
        }
        if self.cerebellum is not None:
            record["cerebellum_loss"] = self.cerebellum_loss()
        return record

    def _summary(self, train_loss: float, wall: float, epoch_seconds: list) -> dict:
        config = self.config
        validation = self.evaluate(self.task.validation)
        test = self.evaluate(self.task.test)
        summary = {
            "task": config.task,
            "model": config.model,
            "schedule": "in-process",
            "chunks": config.chunks,
            "truncation": self.truncation,
            "seq_len": self.task.seq_len,
            "seed": config.seed,
            "steps": self.steps,
            "epochs": self.epoch,
            "wall_seconds": wall,
            "seconds_per_epoch": sum(epoch_seconds) / max(len(epoch_seconds), 1),
            "train_loss": train_loss,
            **summary_fields(validation, test, self.task.drawing),
            "config": config.to_dict(),
        }
        return summary


ATAXIA_MEASURES = ("dysmetria", "overshoot", "tremor")


def curve_fields(validation: dict[str, Any]) -> dict[str, Any]:
    """What a ``curve.jsonl`` line keeps of a validation: loss, metric, and the
    ataxia measures and task metrics where the task has them."""
    fields = {
        "validation_loss": validation["loss"],
        "metric": validation["metric"],
        "metric_name": validation["metric_name"],
    }
    fields.update({n: validation[n] for n in ATAXIA_MEASURES if n in validation})
    if "task_metrics" in validation:
        fields["task_metrics"] = validation["task_metrics"]
    return fields


def summary_fields(
    validation: dict[str, Any], test: dict[str, Any], drawing: bool
) -> dict[str, Any]:
    """What ``summary.json`` keeps of the final validation and test."""
    fields: dict[str, Any] = {
        "validation_loss": validation["loss"],
        "validation_metric": validation["metric"],
        "test_loss": test["loss"],
        "test_metric": test["metric"],
        "metric_name": validation["metric_name"],
    }
    if drawing:
        fields["ataxia"] = {name: validation[name] for name in ATAXIA_MEASURES}
    if "task_metrics" in validation:
        fields["task_metrics"] = {
            "validation": validation["task_metrics"],
            "test": test["task_metrics"],
        }
    return fields


def example_trajectories(
    trainer: Trainer, split: SequenceData, per_label: int = 1
) -> dict[str, dict[str, list]]:
    """A drawn and a target trajectory for each cue or class (for reports)."""
    outputs = trainer.predict(split.inputs)
    result = {}
    for label in sorted(set(split.labels.tolist())):
        index = (split.labels == label).nonzero().flatten()[:per_label]
        result[str(label)] = {
            "drawn": outputs[index].tolist(),
            "target": split.targets[index].tolist(),
        }
    return result
