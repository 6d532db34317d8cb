"""The cerebellum's gRPC servicer: microzones answering a remote cortex.

``CerebellumServicer`` wraps one :class:`LocalCerebellum` behind the
``ccdni.v1.Cerebellum`` service::

    cortex ──Predict(queries)──▶ validate all ──▶ LocalCerebellum.predict ──▶ reply
       │    (or each request of a PredictStream)     (caches each activity)
       └──Learn(stream)──▶ assemble frames ──▶ validate ──▶ observe_one ──┐
                                                                         ▼
                       learner thread: update() whenever observations are pending

Learning runs beside prediction: the learner thread batches whatever observed
feedback has arrived into one ``update()``, and ``LocalCerebellum`` holds its lock
only around the optimiser step, so a prediction waits at most for one step, never
for a whole forward and backward pass.

Bad input is answered with a specific status code and a message naming the field
(see the table in docs/SERVICES.md), counted as ``rejected.<reason>``, and
changes nothing: every query of a Predict call is validated before any is
answered. In a Learn stream, a frame that cannot be decoded ends the stream with
INVALID_ARGUMENT (the observations before it stay taken); a well-formed
observation that does not fit (unknown zone, wrong width, values not finite,
olive lesion) is counted in ``LearnReply.rejected`` and the stream goes on, as
the schema describes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgpack
import torch

from cerebellum_service.config import (
    MAX_ZONE_PARAMETERS,
    CerebellumConfig,
    ConfigError,
    parse_lesion,
)
from cerebellum_service.learning import ActivityKey, LocalCerebellum, Observation, Query
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.checkpoint import atomic_write as write_atomic
from protos.codec import (
    SUPPORTED_DTYPES,
    CodecError,
    FrameAssembler,
    all_finite,
    check_finite,
    decode,
    encode,
)
from protos.service import (
    Counters,
    RequestError,
    add_servicer,
    reject,
    reject_error,
)

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Cerebellum"]
SERVICE_NAME = SERVICE.full_name

CHECKPOINT_FORMAT = "ccdni.cerebellum/1"
MANIFEST_SUFFIX = ".manifest"
"""A checkpoint at PATH has a msgpack manifest at PATH + MANIFEST_SUFFIX."""

INPUT_DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Wire dtypes accepted for activity, context and observed feedback."""

REJECTION_REASONS = (
    "not_configured",
    "config",
    "config_too_large",
    "missing_field",
    "placeholder",
    "dtype",
    "shape",
    "width",
    "byte_count",
    "not_finite",
    "context",
    "unknown_zone",
    "part_sequence",
    "olive_lesion",
    "path",
    "not_found",
    "permission",
    "checkpoint_write",
    "checkpoint_corrupt",
    "learner_failed",
    "unknown_counter",
    "unparsable",
)
"""Every ``rejected.<reason>`` counter (Stats reports each, from zero)."""

_COUNTERS = (
    "predict_calls",
    "predict_streams",
    "predictions",
    "predictions_lesioned",
    "predictions_zeros",
    "learn_streams",
    "observations",
    "accepted",
    "cache_misses",
    "updates",
    "update_requests",
    "configures",
    "checkpoints",
    "restores",
    "learner_errors",
)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class _Current:
    """What one call works on: swapped as a whole by Configure and Restore."""

    cerebellum: LocalCerebellum
    config: CerebellumConfig
    generation: int


class CerebellumServicer(pb_grpc.CerebellumServicer):
    """``ccdni.v1.Cerebellum`` over a ``LocalCerebellum``, learning in the background.

    Args:
        config: microzones to start with; ``None`` waits for ``Configure``.
        checkpoint_dir: if set, Checkpoint and Restore paths must lie inside it
            (relative paths are taken from it); otherwise any path the process
            can reach.
        max_zone_parameters: largest microzone ``Configure`` may ask for.

    Call ``close`` when done (``start_server``'s ``on_stop`` does).
    """

    def __init__(
        self,
        config: CerebellumConfig | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        max_zone_parameters: int = MAX_ZONE_PARAMETERS,
    ) -> None:
        self.counters = Counters(
            [*_COUNTERS, *(f"rejected.{reason}" for reason in REJECTION_REASONS)]
        )
        self.checkpoint_dir = (
            None if checkpoint_dir is None else Path(checkpoint_dir).resolve()
        )
        self.max_zone_parameters = max_zone_parameters
        self._swap_lock = threading.Lock()
        self._current: _Current | None = None
        self._generation = 0
        self._step = 0
        self._step_changed = threading.Condition()
        self._learner_error: tuple[int, BaseException] | None = None
        self._wake = threading.Event()
        self._closing = False
        if config is not None:
            self._install(config, config.build(), step=0)
        self._learner = threading.Thread(
            target=self._learn_loop, name="cerebellum-learner", daemon=True
        )
        self._learner.start()

    # Lifecycle -------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Learning steps (non-empty updates) of the current cerebellum."""
        with self._swap_lock:
            return self._step

    @property
    def cerebellum(self) -> LocalCerebellum | None:
        """The cerebellum answering now (``None`` before Configure)."""
        current = self._current
        return None if current is None else current.cerebellum

    @property
    def config(self) -> CerebellumConfig | None:
        """The settings of the cerebellum answering now (``None`` before Configure)."""
        current = self._current
        return None if current is None else current.config

    def install(
        self, config: CerebellumConfig, cerebellum: LocalCerebellum, step: int = 0
    ) -> None:
        """Swap in ``cerebellum`` (built from ``config``), e.g. one restored by an
        actor from its own checkpoint; later calls use it."""
        self._install(config, cerebellum, step)

    def wait_for_step(self, step: int, timeout: float) -> bool:
        """Block until the learning step reaches ``step``; return whether it did."""
        with self._step_changed:
            return self._step_changed.wait_for(lambda: self.step >= step, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the learner thread (after the update it may be running)."""
        self._closing = True
        self._wake.set()
        self._learner.join(timeout)

    def _install(
        self, config: CerebellumConfig, cerebellum: LocalCerebellum, step: int
    ) -> None:
        with self._swap_lock:
            self._generation += 1
            self._current = _Current(cerebellum, config, self._generation)
            self._step = step
        with self._step_changed:
            self._step_changed.notify_all()
        logger.info(
            "cerebellum configured: zones %s, lr %g, cache %d, lesion %s, step %d",
            ", ".join(config.zone_names),
            config.lr,
            config.cache_size,
            config.lesion,
            step,
        )

    def _require_current(self, context: grpc.ServicerContext) -> _Current:
        current = self._current
        if current is None:
            reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the cerebellum has no microzones yet; call Configure (or Restore) "
                "first",
                self.counters,
                "not_configured",
            )
        return current

    # Learner thread ----------------------------------------------------------------

    def _learn_loop(self) -> None:
        while True:
            self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            current = self._current
            if current is None or current.config.learning == "on_update":
                continue  # on_update: Learn applies updates where frames ask
            self._update(current)

    def _update(self, current: _Current) -> None:
        """One update of ``current``'s cerebellum with what it has accepted."""
        if self._failed(current):
            return
        try:
            losses = current.cerebellum.update()
        except Exception as error:
            # Not swallowed: Learn answers INTERNAL from now on and Stats
            # reports learner_failed until Configure or Restore replaces the
            # cerebellum; predictions go on with the last good weights.
            logger.exception("cerebellum update failed; learning stops")
            self.counters.add("learner_errors")
            self._learner_error = (current.generation, error)
            return
        if not losses:
            return
        with self._swap_lock:
            if current.generation == self._generation:
                self._step += 1
        self.counters.add("updates")
        with self._step_changed:
            self._step_changed.notify_all()
        logger.debug("update: losses %s", losses)

    def _failed(self, current: _Current) -> bool:
        error = self._learner_error
        return error is not None and error[0] == current.generation

    # Predict -------------------------------------------------------------------------

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictReply:
        """Predicted feedback for every query, in query order."""
        return self._answer(request, context)

    def PredictStream(
        self, request_iterator: Iterator[pb.PredictRequest], context
    ) -> Iterator[pb.PredictReply]:
        """Predict for each request of one long-lived stream, in order.

        What a unary Predict would refuse ends the stream with the same status;
        the requests before it stay answered (``RemoteCerebellum`` raises the
        status for that request and asks those sent behind it unary).
        """
        self.counters.add("predict_streams")
        for request in request_iterator:
            yield self._answer(request, context)

    def _answer(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictReply:
        current = self._require_current(context)
        try:
            queries = [
                self._query(index, query, current.cerebellum)
                for index, query in enumerate(request.queries)
            ]
        except RequestError as error:
            reject_error(context, error, self.counters)

        reply = pb.PredictReply(step=self.step)
        self.counters.add("predict_calls")
        if current.config.lesion == "cerebellum":
            reply.predictions.extend(pb.Tensor() for _ in queries)
            reply.available.extend(False for _ in queries)
            self.counters.add("predictions_lesioned", len(queries))
            return reply

        if current.config.answer_zeros:
            for query, dtype in queries:
                rows = query.activity.shape[0]
                width = current.cerebellum.zones[query.zone].out_features
                encode(
                    torch.zeros(rows, width, dtype=dtype), out=reply.predictions.add()
                )
                reply.available.append(True)
            self.counters.add("predictions_zeros", len(queries))
            return reply

        predictions = current.cerebellum.predict([query for query, _ in queries])
        for (_, dtype), prediction in zip(queries, predictions, strict=True):
            encode(prediction.to(dtype), out=reply.predictions.add())
            reply.available.append(True)
        self.counters.add("predictions", len(queries))
        return reply

    def _query(
        self, index: int, msg: pb.ZoneQuery, cerebellum: LocalCerebellum
    ) -> tuple[Query, torch.dtype]:
        """Validate one query; return it and the dtype to answer in."""
        field = f"queries[{index}]"
        zone = cerebellum.zones[msg.zone] if msg.zone in cerebellum.zones else None
        if zone is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"{field}.zone: is {msg.zone!r}, which is not a microzone here; "
                f"expected one of {sorted(cerebellum.zones)}",
                "unknown_zone",
            )
        if not msg.HasField("activity"):
            raise RequestError(
                _INVALID, f"{field}.activity: is missing", "missing_field"
            )
        kept_as = cerebellum.storage_dtype(msg.zone)

        activity = decode_matrix(msg.activity, f"{field}.activity", unary=True)
        check_columns(
            activity,
            f"{field}.activity",
            zone.in_features,
            f"in_features of zone {msg.zone!r}",
        )
        context = None
        if msg.HasField("context") or zone.context_size:
            context = self._context(msg, field, zone.context_size, activity.shape[0])
            context = finite(context.to(kept_as), f"{field}.context")
        answer_dtype = activity.dtype
        activity = finite(activity.to(kept_as), f"{field}.activity")
        key = activity_key(msg.key)
        return Query(msg.zone, key, activity, context), answer_dtype

    @staticmethod
    def _context(
        msg: pb.ZoneQuery, field: str, context_size: int, rows: int
    ) -> torch.Tensor:
        if not context_size:
            raise RequestError(
                _INVALID,
                f"{field}.context: is set, but zone {msg.zone!r} takes no context; "
                "expected it unset",
                "context",
            )
        if not msg.HasField("context"):
            raise RequestError(
                _INVALID,
                f"{field}.context: is missing; zone {msg.zone!r} expects "
                f"[{rows}, {context_size}]",
                "context",
            )
        context = decode_matrix(msg.context, f"{field}.context", unary=True)
        if list(context.shape) != [rows, context_size]:
            raise RequestError(
                _INVALID,
                f"{field}.context.shape: is {list(context.shape)}; expected "
                f"[{rows}, {context_size}] (rows of the activity, context_size of "
                f"zone {msg.zone!r})",
                "context",
            )
        return context

    # Learn -------------------------------------------------------------------------

    def Learn(
        self, request_iterator: Iterator[pb.LearnRequest], context: grpc.ServicerContext
    ) -> pb.LearnReply:
        """Take a stream of observed feedback; reply with what became of it."""
        self._require_current(context)
        self.counters.add("learn_streams")
        reply = pb.LearnReply()
        assembler = FrameAssembler("learn")
        index = -1
        try:
            for index, frame in enumerate(request_iterator):
                whole = assembler.feed(frame)
                if whole is not None:
                    self._learn_one(whole, index, reply, context)
            assembler.close()
        except CodecError as error:
            reject(
                context,
                _INVALID,
                f"frame {index}: {error}",
                self.counters,
                "part_sequence",
            )
        return reply

    def _learn_one(
        self,
        msg: pb.LearnRequest,
        index: int,
        reply: pb.LearnReply,
        context: grpc.ServicerContext,
    ) -> None:
        current = self._require_current(context)
        if self._failed(current):
            reject(
                context,
                grpc.StatusCode.INTERNAL,
                f"the learner stopped after an error ({self._learner_error[1]!r}); "
                "Configure or Restore to start again",
                self.counters,
                "learner_failed",
            )
        if msg.zone or msg.HasField("observed") or not msg.update:
            self._take_observation(msg, index, reply, context, current)
        if msg.update:
            # In the handler's thread, so the frames after it (and the reply
            # that ends the stream) come after the update: a client that waits
            # for the reply predicts with the updated weights.
            self.counters.add("update_requests")
            self._update(current)
            if self._failed(current):
                reject(
                    context,
                    grpc.StatusCode.INTERNAL,
                    f"frame {index}: the update failed "
                    f"({self._learner_error[1]!r}); Configure or Restore to start "
                    "again",
                    self.counters,
                    "learner_failed",
                )

    def _take_observation(
        self,
        msg: pb.LearnRequest,
        index: int,
        reply: pb.LearnReply,
        context: grpc.ServicerContext,
        current: _Current,
    ) -> None:
        self.counters.add("observations")
        try:
            observation = self._observation(msg, f"frame {index}")
        except RequestError as error:
            reject_error(context, error, self.counters)

        outcome, reason = self._hand_over(observation, current, f"frame {index}")
        if outcome == "accepted":
            reply.accepted += 1
            self.counters.add("accepted")
            self._wake.set()
        elif outcome == "cache_miss":
            reply.cache_misses += 1
            self.counters.add("cache_misses")
        else:
            reply.rejected += 1
            self.counters.add(f"rejected.{reason}")

    def _observation(self, msg: pb.LearnRequest, field: str) -> Observation:
        """Decode one whole frame; RequestError where it cannot be decoded."""
        if not msg.zone:
            raise RequestError(_INVALID, f"{field}.zone: is empty", "missing_field")
        if not msg.HasField("observed"):
            raise RequestError(
                _INVALID, f"{field}.observed: is missing", "missing_field"
            )
        observed = decode_matrix(msg.observed, f"{field}.observed")
        activity = context = None
        if msg.HasField("activity"):
            activity = decode_matrix(msg.activity, f"{field}.activity")
        if msg.HasField("context"):
            if activity is None:
                raise RequestError(
                    _INVALID,
                    f"{field}.context: is set without activity; the cached "
                    "context is used when activity is unset",
                    "context",
                )
            context = decode_matrix(msg.context, f"{field}.context")
        return Observation(msg.zone, activity_key(msg.key), observed, activity, context)

    def _hand_over(
        self, observation: Observation, current: _Current, field: str
    ) -> tuple[str, str | None]:
        """Check an observation against its zone and hand it to the cerebellum.

        Returns (outcome, reason): ``accepted``, ``cache_miss``, or ``rejected``
        with the reason it was refused.
        """
        cerebellum = current.cerebellum
        zone = (
            cerebellum.zones[observation.zone]
            if observation.zone in (cerebellum.zones)
            else None
        )
        if zone is None:
            logger.debug("%s: unknown zone %r", field, observation.zone)
            return "rejected", "unknown_zone"
        if current.config.lesion == "olive":
            return "rejected", "olive_lesion"

        reason = _fit_reason(observation, zone)
        if reason is not None:
            return "rejected", reason
        dtype = cerebellum.storage_dtype(observation.zone)
        converted = [
            None if tensor is None else tensor.to(dtype)
            for tensor in (
                observation.feedback,
                observation.activity,
                observation.context,
            )
        ]
        for tensor in converted:
            if tensor is not None and not all_finite(tensor):
                return "rejected", "not_finite"
        observation = Observation(observation.zone, observation.key, *converted)
        try:
            outcome = cerebellum.observe_one(observation)
        except ValueError as error:
            # Rows that do not match the cached activity of the same key.
            logger.debug("%s: %s", field, error)
            return "rejected", "shape"
        if outcome == "frozen":
            return "rejected", "olive_lesion"
        return outcome, None

    # Control ----------------------------------------------------------------------

    def Configure(
        self, request: pb.ConfigureRequest, context: grpc.ServicerContext
    ) -> pb.ConfigureReply:
        """Replace the cerebellum (``zones`` given) or change only its lesion."""
        try:
            raw = msgpack.unpackb(request.config, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError) as error:
            reject(
                context,
                _INVALID,
                f"config: is not a msgpack map ({error})",
                self.counters,
                "config",
            )

        current = self._current
        try:
            if isinstance(raw, dict) and set(raw) == {"lesion"}:
                config = self._lesion_only(raw, current, context)
                cerebellum = current.cerebellum
                cerebellum.frozen = config.lesion == "olive"
                with self._swap_lock:
                    self._current = _Current(cerebellum, config, current.generation)
                logger.info("lesion set to %s", config.lesion)
            else:
                config = CerebellumConfig.from_dict(
                    raw, max_zone_parameters=self.max_zone_parameters
                )
                self._install(config, config.build(), step=0)
        except ConfigError as error:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if error.too_large else _INVALID
            reason = "config_too_large" if error.too_large else "config"
            reject(context, code, f"config.{error}", self.counters, reason)

        self.counters.add("configures")
        return pb.ConfigureReply(config=msgpack.packb(config.to_dict()))

    def _lesion_only(
        self, raw: dict, current: _Current | None, context: grpc.ServicerContext
    ) -> CerebellumConfig:
        lesion = parse_lesion(raw["lesion"])
        if current is None:
            reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "config: sets only 'lesion', but there is no cerebellum to lesion "
                "yet; send 'zones' too",
                self.counters,
                "not_configured",
            )
        return current.config.with_lesion(lesion)

    def Stats(
        self, request: pb.StatsRequest, context: grpc.ServicerContext
    ) -> pb.StatsReply:
        """Counters by name (all of them when ``names`` is empty)."""
        counters = self.stats()
        names = list(request.names)
        unknown = [name for name in names if name not in counters]
        if unknown:
            reject(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"names: {unknown[:5]} are not counters; expected names such as "
                f"{sorted(counters)[:8]} (send no names for all)",
                self.counters,
                "unknown_counter",
            )
        if names:
            counters = {name: counters[name] for name in names}
        return pb.StatsReply(counters=counters)

    def stats(self) -> dict[str, float]:
        """Every counter, with the current cerebellum's per-zone statistics."""
        counters = self.counters.snapshot()
        counters["rejected"] = sum(
            value for name, value in counters.items() if name.startswith("rejected.")
        )
        current = self._current
        counters["step"] = self.step
        counters["configured"] = float(current is not None)
        counters["learner_failed"] = float(
            current is not None and self._failed(current)
        )
        if current is None:
            return counters

        lesion = current.config.lesion
        counters["lesion.cerebellum"] = float(lesion == "cerebellum")
        counters["lesion.olive"] = float(lesion == "olive")
        counters["evictions"] = current.cerebellum.evictions
        for name, zone_stats in current.cerebellum.stats.items():
            prefix = f"zone.{name}."
            counters[prefix + "predictions"] = zone_stats.predictions
            counters[prefix + "observations"] = zone_stats.observations
            counters[prefix + "cache_misses"] = zone_stats.cache_misses
            counters[prefix + "updates"] = zone_stats.updates
            counters[prefix + "last_loss"] = zone_stats.last_loss
            counters[prefix + "last_cosine"] = zone_stats.last_cosine
        return counters

    def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointReply:
        """Write the microzones, optimiser and config atomically to ``path``."""
        current = self._require_current(context)
        try:
            path = self._resolve(request.path, "path", must_exist=False)
        except RequestError as error:
            reject_error(context, error, self.counters)

        step = self.step
        try:
            size = save_checkpoint(path, current.config, current.cerebellum, step)
        except OSError as error:
            code = {
                errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
                errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
                errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
            }.get(error.errno, grpc.StatusCode.INTERNAL)
            logger.warning("checkpoint %s not written: %s", path, error)
            reject(
                context,
                code,
                f"path: could not write {str(path)!r} ({error}); any earlier "
                "checkpoint there is unchanged",
                self.counters,
                "checkpoint_write",
            )

        self.counters.add("checkpoints")
        logger.info("checkpoint of step %d written to %s", step, path)
        return pb.CheckpointReply(path=str(path), step=step, size_bytes=size)

    def Restore(
        self, request: pb.RestoreRequest, context: grpc.ServicerContext
    ) -> pb.RestoreReply:
        """Replace the cerebellum with the one checkpointed at ``path``."""
        try:
            path = self._resolve(request.path, "path", must_exist=True)
        except RequestError as error:
            reject_error(context, error, self.counters)
        try:
            config, cerebellum, step = load_checkpoint(
                path, max_zone_parameters=self.max_zone_parameters
            )
        except CheckpointError as error:
            code = _INVALID if error.wrong_format else grpc.StatusCode.DATA_LOSS
            reject(context, code, f"path: {error}", self.counters, "checkpoint_corrupt")

        self._install(config, cerebellum, step=step)
        self.counters.add("restores")
        return pb.RestoreReply(path=str(path), step=step)

    def _resolve(self, raw: str, field: str, *, must_exist: bool) -> Path:
        """A checkpoint path, inside ``checkpoint_dir`` when one is set."""
        if not raw:
            raise RequestError(
                _INVALID, f"{field}: is empty; expected a file path", "path"
            )
        if "\x00" in raw or len(raw) > 4096:
            raise RequestError(
                _INVALID,
                f"{field}: is not a usable path (NUL byte or over 4096 characters)",
                "path",
            )
        base = self.checkpoint_dir or Path.cwd()
        try:
            path = (base / raw).resolve()
        except (OSError, RuntimeError) as error:
            raise RequestError(
                _INVALID, f"{field}: {raw!r} cannot be resolved ({error})", "path"
            ) from error
        if self.checkpoint_dir is not None and not path.is_relative_to(
            self.checkpoint_dir
        ):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{field}: {raw!r} lies outside the checkpoint directory "
                f"{str(self.checkpoint_dir)!r}; expected a path inside it",
                "permission",
            )
        try:
            if must_exist and not path.is_file():
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"{field}: {str(path)!r} is not a checkpoint file",
                    "not_found",
                )
            if not must_exist and path.is_dir():
                raise RequestError(
                    _INVALID,
                    f"{field}: {str(path)!r} is a directory; expected a file path",
                    "path",
                )
            if not must_exist and not path.parent.is_dir():
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"{field}: directory {str(path.parent)!r} does not exist",
                    "not_found",
                )
        except OSError as error:
            raise RequestError(
                _INVALID, f"{field}: {raw!r} cannot be used ({error})", "path"
            ) from error
        return path


# --- wire helpers -------------------------------------------------------------------


def _fit_reason(observation: Observation, zone: torch.nn.Module) -> str | None:
    """Why a decoded observation does not fit its zone's widths, or ``None``."""
    if observation.feedback.shape[1] != zone.out_features:
        return "width"
    if observation.activity is None:
        return None
    if observation.activity.shape[1] != zone.in_features:
        return "width"
    rows = observation.activity.shape[0]
    context = observation.context
    if observation.feedback.shape[0] != rows:
        return "shape"
    if not zone.context_size:
        return None if context is None else "context"
    if context is None or list(context.shape) != [rows, zone.context_size]:
        return "context"
    return None


def activity_key(msg: pb.ActivityKey) -> ActivityKey:
    """The learning rule's key for a wire key."""
    return ActivityKey(
        batch=msg.batch,
        window=msg.window,
        chunk=msg.chunk,
        micro_batch=msg.micro_batch,
        run=msg.run,
    )


def key_message(key: ActivityKey) -> pb.ActivityKey:
    """The wire key for a learning-rule key."""
    return pb.ActivityKey(
        run=key.run,
        batch=key.batch,
        window=key.window,
        chunk=key.chunk,
        micro_batch=key.micro_batch,
    )


def decode_matrix(msg: pb.Tensor, field: str, *, unary: bool = False) -> torch.Tensor:
    """Decode an ``(N, width)`` floating-point tensor with ``N >= 1``.

    Checks dtype, rank, rows and byte count before touching the payload, so a
    malformed message costs no allocation.

    Raises:
        RequestError: INVALID_ARGUMENT naming the field and what was expected.
    """
    if msg.parts:
        where = (
            "a unary call carries its tensors inline"
            if unary
            else "its parts never arrived"
        )
        raise RequestError(
            _INVALID,
            f"{field}.parts: is {msg.parts}; expected 0 ({where})",
            "placeholder",
        )
    if msg.dtype not in INPUT_DTYPES:
        raise RequestError(
            _INVALID,
            f"{field}.dtype: is {msg.dtype!r}; expected one of {list(INPUT_DTYPES)}",
            "dtype",
        )
    shape = list(msg.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise RequestError(
            _INVALID,
            f"{field}.shape: is {shape}; expected [N, width] with N >= 1 and "
            "width >= 1",
            "shape",
        )
    expected = shape[0] * shape[1] * SUPPORTED_DTYPES[msg.dtype].itemsize
    if len(msg.data) != expected:
        raise RequestError(
            _INVALID,
            f"{field}.data: holds {len(msg.data)} bytes; dtype {msg.dtype} with "
            f"shape {shape} needs {expected}",
            "byte_count",
        )
    return decode(msg, field=field)


def check_columns(tensor: torch.Tensor, field: str, width: int, what: str) -> None:
    """Raise RequestError (``width``) unless ``tensor`` has ``width`` columns."""
    if tensor.shape[1] != width:
        raise RequestError(
            _INVALID,
            f"{field}.shape: is {list(tensor.shape)}; expected [N, {width}] ({what})",
            "width",
        )


def finite(tensor: torch.Tensor, field: str) -> torch.Tensor:
    """``tensor``, or RequestError (``not_finite``) if any value is NaN or infinite.

    Checked after conversion to the zone's dtype, so a float64 value too large
    for a float32 zone is caught too.
    """
    try:
        check_finite(tensor, field)
    except CodecError as error:
        raise RequestError(_INVALID, str(error), "not_finite") from error
    return tensor


class CheckpointError(ValueError):
    """A file that is not a usable cerebellum checkpoint.

    Attributes:
        wrong_format: it is readable but holds something else (not damage).
    """

    def __init__(self, message: str, *, wrong_format: bool = False) -> None:
        super().__init__(message)
        self.wrong_format = wrong_format


def save_checkpoint(
    path: str | Path,
    config: CerebellumConfig,
    cerebellum: LocalCerebellum,
    step: int,
) -> int:
    """Write a checkpoint atomically, with a msgpack manifest beside it.

    The file holds the format tag, the settings (so a fresh server can rebuild
    the microzones), the learning step and ``cerebellum.state_dict()``. The
    manifest at ``path + MANIFEST_SUFFIX`` records format, step, size, SHA-256
    and zone names for tools that should not load torch files.

    Returns:
        The checkpoint's size in bytes.

    Raises:
        OSError: it could not be written; an earlier file at ``path`` is intact.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "step": step,
        "cerebellum": cerebellum.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint": path.name,
        "step": step,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "zones": list(config.zone_names),
        "written_unix_s": time.time(),
    }

    write_atomic(path, data)
    write_atomic(path.with_name(path.name + MANIFEST_SUFFIX), msgpack.packb(manifest))
    return len(data)


def load_checkpoint(
    path: str | Path, *, max_zone_parameters: int = MAX_ZONE_PARAMETERS
) -> tuple[CerebellumConfig, LocalCerebellum, int]:
    """Rebuild the cerebellum saved by ``save_checkpoint``: settings, weights, step.

    Raises:
        CheckpointError: the file cannot be read as one, or its contents do not
            fit together.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # Not swallowed, reported: on bytes that are not a checkpoint, torch's
        # unpickler raises whatever its parser trips over (struct.error,
        # UnicodeDecodeError, IndexError, ... besides the usual RuntimeError).
        raise CheckpointError(
            f"{str(path)!r} cannot be read as a checkpoint "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state)
        raise CheckpointError(
            f"{str(path)!r} holds format {found!r}; expected a cerebellum "
            f"checkpoint ({CHECKPOINT_FORMAT!r})",
            wrong_format=True,
        )

    try:
        config = CerebellumConfig.from_dict(
            state.get("config"), max_zone_parameters=max_zone_parameters
        )
        cerebellum = config.build()
        cerebellum.load_state_dict(state["cerebellum"])
        step = state["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"step is {step!r}; expected an integer >= 0")
    except (ConfigError, KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{str(path)!r} is a damaged cerebellum checkpoint "
            f"({type(error).__name__}: {error})"
        ) from error
    cerebellum.frozen = config.lesion == "olive"
    # A measuring device's setting, not the cerebellum's: what comes back from a
    # checkpoint is a cerebellum that computes.
    return dataclasses.replace(config, answer_zeros=False), cerebellum, step


def read_manifest(path: str | Path) -> dict:
    """The manifest written beside the checkpoint at ``path``."""
    manifest = Path(str(path) + MANIFEST_SUFFIX)
    return msgpack.unpackb(manifest.read_bytes(), raw=False)


def add_to_server(servicer: CerebellumServicer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server`` (for ``protos.service.start_server``).

    Requests are parsed by ``protos.service.add_servicer``, so bytes that are
    not a request message are refused INVALID_ARGUMENT and counted.
    """
    add_servicer(server, SERVICE, servicer, servicer.counters)
