"""Validated run configuration, with each task's defaults.

Every check names the command-line flag that sets the value, so a bad
configuration says what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Model = Literal["ccrnn", "crnn", "bptt"]
MODELS: tuple[str, ...] = ("ccrnn", "crnn", "bptt")
CONTEXT_ZONES: tuple[str, ...] = ("all", "state", "output")
# The settings under which decoupled's output microzone can predict the spatial
# cut's feedback: the label and the time step, for output zones only
# (docs/DISTRIBUTED.md). The bench and the demo train with them.
OUTPUT_CONTEXT: dict[str, Any] = dict(
    context=True, time_context=True, context_zones="output"
)
LESIONS: tuple[str, ...] = ("cerebellum", "olive")
UPDATES: tuple[str, ...] = ("sequence", "window")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


@dataclass(frozen=True)
class Lesion:
    """Turn the cerebellum off (``cerebellum``) or freeze its learning (``olive``)."""

    kind: str
    epoch: int

    @classmethod
    def parse(cls, text: str) -> Lesion:
        kind, sep, epoch = text.partition("@")
        if not sep or kind not in LESIONS or not epoch.isdigit():
            raise ConfigError(
                f"--lesion {text!r}: expected KIND@EPOCH with KIND in "
                f"{'/'.join(LESIONS)}, e.g. cerebellum@10"
            )
        return cls(kind, int(epoch))


# The paper's settings where they fit a 2-core machine; docs/EXPERIMENTS.md lists
# where these depart from the paper and why.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "line": dict(
        hidden_size=50, granule_width=400, truncation=1, batch_size=50, epochs=200
    ),
    "digit-lines": dict(
        hidden_size=64, granule_width=512, truncation=4, batch_size=50, epochs=150
    ),
    "digits": dict(
        hidden_size=64, granule_width=512, truncation=4, batch_size=50, epochs=150
    ),
    "patterns": dict(
        hidden_size=64, granule_width=512, truncation=4, batch_size=50, epochs=80
    ),
    "captions": dict(
        hidden_size=256,
        granule_width=1024,
        granule_layers=2,
        truncation=5,
        batch_size=50,
        epochs=20,
        update="window",
        dropout=0.5,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; see ``ccdni train --help``."""

    task: str = "line"
    model: str = "ccrnn"
    truncation: int | None = 1  # None: the whole sequence (what ``bptt`` uses)
    epochs: int = 60
    seed: int = 0
    batch_size: int = 50
    hidden_size: int = 50
    layers_per_chunk: int = 1
    chunks: int = 1
    lr: float = 1e-3
    cerebellum_lr: float = 1e-3
    granule_width: int = 400
    granule_layers: int = 1
    inputs_per_granule: int | None = None
    context: bool = False
    time_context: bool = False
    context_zones: str = "all"  # which microzones get the context
    feedback_scale: float = 0.1
    output_feedback_scale: float | None = None  # None: feedback_scale
    clip: float = 1.0  # gradient-norm clip; 0 turns it off
    update: str = "sequence"
    dropout: float = 0.0
    lesions: tuple[Lesion, ...] = ()
    eval_every: int = 1  # epochs
    data_dir: str | None = None
    n_train: int | None = None
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(
                f"--model {self.model!r}: choose one of {', '.join(MODELS)}"
            )
        if self.context_zones not in CONTEXT_ZONES:
            raise ConfigError(
                f"--context-zones {self.context_zones!r}: choose one of "
                f"{', '.join(CONTEXT_ZONES)}"
            )
        if self.update not in UPDATES:
            raise ConfigError(
                f"--update {self.update!r}: choose one of {', '.join(UPDATES)}"
            )
        positive = {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--hidden": self.hidden_size,
            "--layers-per-chunk": self.layers_per_chunk,
            "--chunks": self.chunks,
            "--granule-width": self.granule_width,
            "--granule-layers": self.granule_layers,
            "--eval-every": self.eval_every,
            "--threads": self.threads,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.truncation is not None and self.truncation < 1:
            raise ConfigError(
                f"--truncation must be at least 1 or 'full', got {self.truncation}"
            )
        for flag, value in (("--lr", self.lr), ("--cerebellum-lr", self.cerebellum_lr)):
            if not value > 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if self.feedback_scale < 0:
            raise ConfigError(
                f"--feedback-scale must be non-negative, got {self.feedback_scale}"
            )
        if self.output_feedback_scale is not None and self.output_feedback_scale < 0:
            raise ConfigError(
                "--output-feedback-scale must be non-negative, got "
                f"{self.output_feedback_scale}"
            )
        if self.clip < 0:
            raise ConfigError(
                f"--clip must be positive (or 0 for none), got {self.clip}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.inputs_per_granule is not None and self.inputs_per_granule < 1:
            raise ConfigError(
                "--inputs-per-granule must be at least 1, "
                f"got {self.inputs_per_granule}"
            )
        for lesion in self.lesions:
            if lesion.epoch >= self.epochs:
                raise ConfigError(
                    f"--lesion {lesion.kind}@{lesion.epoch} is at or after the last "
                    f"epoch ({self.epochs - 1}); lower it or raise --epochs"
                )
        if self.lesions and self.model != "ccrnn":
            raise ConfigError(f"--lesion needs --model ccrnn, got --model {self.model}")

    @property
    def uses_cerebellum(self) -> bool:
        return self.model == "ccrnn"

    def effective_truncation(self, seq_len: int) -> int:
        """Window length for a sequence of ``seq_len`` steps (bptt: the sequence)."""
        if self.model == "bptt" or self.truncation is None:
            return seq_len
        return min(self.truncation, seq_len)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["lesions"] = [f"{x.kind}@{x.epoch}" for x in self.lesions]
        return record

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def for_task(task: str, **overrides: Any) -> TrainConfig:
    """The task's defaults, then ``overrides`` (``None`` values are ignored).

    ``truncation="full"`` asks for one window as long as the sequence.
    """
    values: dict[str, Any] = dict(TASK_DEFAULTS.get(task, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("truncation") == "full":
        values["truncation"] = None
    return TrainConfig(task=task, **values)
