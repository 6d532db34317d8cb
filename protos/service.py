"""gRPC plumbing shared by the cortex and cerebellum services.

Both services run the same kind of server and open the same kind of channel, so
the pieces live here once:

- **security**: a bearer token checked on every call (``AuthInterceptor``) and,
  optionally, TLS; a server refuses to start without a token unless told
  ``insecure`` (``ServerSecurity``, ``ClientSecurity``);
- **server**: ``start_server`` builds, binds and starts a ``grpc.Server`` with the
  standard health service, and returns a ``RunningServer`` whose ``stop`` lets
  in-flight calls finish; ``add_servicer`` registers a servicer that parses its
  own requests, so garbage bytes get INVALID_ARGUMENT;
- **client**: ``open_channel`` (token attached to every call), ``wait_ready`` and
  ``call``, which puts a deadline on every call and retries the transient codes
  (UNAVAILABLE, DEADLINE_EXCEEDED) with exponential backoff and jitter;
- **standalone entry points**: ``add_standalone_arguments``,
  ``security_from_args``, ``message_bytes_from_args`` and ``serve_forever``, which
  prints the bound ``host:port`` as the first line on stdout;
- **bad input**: ``RequestError``, ``reject`` and ``Counters``, so a servicer
  answers bad input with a specific status code naming the field, counts it by
  reason and changes no state.

Reconnection comes from gRPC itself (a channel reconnects on its own, with the
backoff set in ``open_channel``) together with the retries of ``call``.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.codec import MAX_MESSAGE_BYTES, grpc_options

logger = logging.getLogger(__name__)

TOKEN_ENV = "CCDNI_TOKEN"
"""Environment variable a standalone server reads its token from."""

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
"""Methods under this prefix are answered without a token (for probes)."""

RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
"""Status codes that ``call`` retries; every other code is raised at once."""

DEFAULT_DEADLINE_S = 5.0
DEFAULT_MAX_WORKERS = 16

# A new channel retries a failed connection after at most this long, so a server
# that comes back is found within about a second rather than gRPC's default two
# minutes.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Seconds past the grace period that RunningServer.stop waits for gRPC.
_STOP_MARGIN_S = 5.0
# Longest status message sent back to a client; a quoted value can be large.
_MAX_DETAILS_CHARS = 2000

ResponseT = TypeVar("ResponseT")


# --- security -----------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """How a server authenticates its callers and encrypts its traffic.

    Attributes:
        token: the bearer token every call must carry (``authorization: Bearer
            <token>``); ``None`` only together with ``insecure``.
        insecure: accept calls without a token (``--insecure-no-auth``); for
            loopback experiments only.
        tls_cert: PEM certificate chain of the server; enables TLS with
            ``tls_key``.
        tls_key: PEM private key matching ``tls_cert``.
    """

    token: str | None = None
    insecure: bool = False
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None:
            _check_token(self.token, "token")
        if self.token is not None and self.insecure:
            raise ValueError(
                "a token and insecure=True (--insecure-no-auth) were both given; "
                "drop --insecure-no-auth to require the token, or unset "
                f"--token-file/{TOKEN_ENV} to run without one"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r}: TLS needs "
                "both --tls-cert and --tls-key, or neither"
            )

    def require_auth_choice(self) -> None:
        """Raise unless there is a token or the caller chose to run without one.

        Raises:
            ValueError: neither a token nor ``insecure`` was given.
        """
        if self.token is None and not self.insecure:
            raise ValueError(
                "refusing to start a server without a token: pass --token-file PATH "
                f"or set {TOKEN_ENV}, or pass --insecure-no-auth to accept "
                "unauthenticated calls"
            )


@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates itself and checks the server.

    Attributes:
        token: bearer token attached to every call; ``None`` sends none.
        tls_root_cert: PEM certificate(s) to trust; enables TLS.
        server_name_override: host name to check the server's certificate
            against instead of the one in the address (tests with
            ``localhost`` certificates).
    """

    token: str | None = None
    tls_root_cert: str | Path | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None:
            _check_token(self.token, "token")
        if self.server_name_override is not None and self.tls_root_cert is None:
            raise ValueError(
                f"server_name_override={self.server_name_override!r} only applies "
                "to TLS; give tls_root_cert as well"
            )


def _check_token(token: str, field: str) -> None:
    if not isinstance(token, str) or not token:
        raise ValueError(f"{field}={token!r} must be a non-empty string")
    bad = [ch for ch in token if not "!" <= ch <= "~"]
    if bad:
        raise ValueError(
            f"{field}: contains {len(bad)} character(s) such as {bad[0]!r} that "
            "cannot travel in gRPC metadata; expected printable ASCII without "
            "spaces (e.g. the output of `openssl rand -hex 32`)"
        )


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuse every call without ``authorization: Bearer <token>`` metadata.

    Health-check methods (``/grpc.health.v1.Health/*``) pass without a token so
    that load balancers and probes can reach them. A missing or wrong token ends
    the call with UNAUTHENTICATED before the servicer sees its request; the token
    is compared in constant time.
    """

    def __init__(self, token: str) -> None:
        """Args: token: the token callers must present."""
        _check_token(token, "token")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(HEALTH_METHOD_PREFIX):
            return continuation(handler_call_details)
        presented = _metadata_value(
            handler_call_details.invocation_metadata, "authorization"
        )
        if presented is not None and hmac.compare_digest(presented, self._expected):
            return continuation(handler_call_details)

        reason = "no authorization metadata" if presented is None else "a wrong token"
        logger.debug("refused %s: %s", method, reason)
        return _denial(continuation(handler_call_details), reason)


def _metadata_value(
    metadata: Iterable[tuple[str, str | bytes]] | None, key: str
) -> bytes | None:
    for name, value in metadata or ():
        if name == key:
            return value.encode() if isinstance(value, str) else bytes(value)
    return None


def _denial(
    handler: grpc.RpcMethodHandler | None, reason: str
) -> grpc.RpcMethodHandler:
    """A handler of the same call shape as ``handler`` that only refuses."""
    message = (
        f"{reason}: every call needs metadata 'authorization: Bearer <token>' "
        "with the server's token"
    )

    def deny(request: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: the refused request is never parsed. An unknown method is
    # refused too, as a client stream, which works whatever the caller sends.
    request_streaming = True if handler is None else handler.request_streaming
    response_streaming = False if handler is None else handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


# --- server -------------------------------------------------------------------


class RunningServer:
    """A started gRPC server and its health service.

    Attributes:
        server: the ``grpc.Server``.
        host: the host it was bound to.
        port: the bound port (the free port chosen when 0 was asked for).
        address: ``host:port``, ready for ``open_channel``.
        health: the health servicer; ``stop`` turns every service NOT_SERVING.
    """

    def __init__(
        self,
        server: grpc.Server,
        host: str,
        port: int,
        health_servicer: health.HealthServicer,
        on_stop: Sequence[Callable[[], None]],
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.address = format_address(host, port)
        self.health = health_servicer
        self._on_stop = list(on_stop)
        self._stopped = False
        self._stop_lock = threading.Lock()

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop gracefully: refuse new calls, let in-flight calls finish.

        Health turns NOT_SERVING first, so probes see the server leaving; calls
        still running after ``grace`` seconds are cancelled. Then the ``on_stop``
        callbacks given to ``start_server`` run. Calling it again does nothing.

        Args:
            grace: seconds in-flight calls may still take; ``None`` cancels them
                at once.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.health.enter_graceful_shutdown()
        # Bounded: gRPC cancels what is left after `grace`, but a leaked call can
        # keep its stop event from ever firing (see add_servicer).
        limit = (grace or 0.0) + _STOP_MARGIN_S
        if not self.server.stop(grace).wait(limit):
            logger.warning(
                "server at %s did not confirm its stop within %.1f s; going on",
                self.address,
                limit,
            )
        for callback in self._on_stop:
            callback()
        logger.info("server at %s stopped", self.address)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops; return whether it did within ``timeout``."""
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def add_servicer(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: object,
    counters: Counters | None = None,
) -> None:
    """Register ``servicer``'s methods for ``service``, parsing requests ourselves.

    Use it instead of the generated ``add_<Service>Servicer_to_server``. The
    servicer's methods keep their usual signatures (message in, message out);
    the difference is who parses the request bytes. Here a request that does
    not parse is answered INVALID_ARGUMENT naming the method and frame, and
    counted as ``rejected.unparsable``, where gRPC's own parser answers INTERNAL.
    It also avoids a grpcio fault (seen with 1.85): after a client stream whose
    first message fails gRPC's parsing, ``server.stop()`` can wait forever.

    Args:
        server: the server, before it starts.
        service: the service's descriptor, e.g.
            ``ccdni_pb2.DESCRIPTOR.services_by_name["Cerebellum"]``.
        servicer: an object with one method per RPC, named as in the schema.
        counters: where to count unparsable requests.
    """
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        serialize = response_type.SerializeToString
        if method.client_streaming:
            wrapped = _parse_stream(behaviour, request_type, method.name, counters)
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
        else:
            wrapped = _parse_unary(behaviour, request_type, method.name, counters)
            make = (
                grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
        handlers[method.name] = make(wrapped, response_serializer=serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _parse(
    raw: bytes,
    request_type: type[Message],
    where: str,
    context: grpc.ServicerContext,
    counters: Counters | None,
) -> Message:
    try:
        return request_type.FromString(raw)
    except DecodeError as error:
        reject(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}: {len(raw)} bytes do not parse as "
            f"{request_type.DESCRIPTOR.full_name} ({error})",
            counters,
            "unparsable",
        )


def _parse_unary(behaviour, request_type, name, counters):
    def handle(raw: bytes, context: grpc.ServicerContext):
        return behaviour(_parse(raw, request_type, name, context, counters), context)

    return handle


def _parse_stream(behaviour, request_type, name, counters):
    def handle(raw_frames: Iterator[bytes], context: grpc.ServicerContext):
        def frames() -> Iterator[Message]:
            for index, raw in enumerate(raw_frames):
                where = f"{name} frame {index}"
                yield _parse(raw, request_type, where, context, counters)

        return behaviour(frames(), context)

    return handle


def start_server(
    add_servicers: Callable[[grpc.Server], None],
    *,
    security: ServerSecurity,
    service_names: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_workers: int = DEFAULT_MAX_WORKERS,
    on_stop: Sequence[Callable[[], None]] = (),
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """Build, bind and start a gRPC server.

    Args:
        add_servicers: adds the service's servicers, e.g.
            ``lambda s: add_CerebellumServicer_to_server(servicer, s)``.
        security: token and TLS settings; without a token, ``insecure`` must be
            set.
        service_names: full names of the services added (``ccdni.v1.Cerebellum``),
            reported SERVING by the health service next to the overall server
            (the empty name).
        host: interface to bind; ``0.0.0.0`` or ``::`` for all.
        port: port to bind; 0 picks a free one (see ``RunningServer.port``).
        max_message_bytes: send and receive limit; clients must use the same.
        max_workers: threads answering calls; each open stream holds one.
        on_stop: callbacks run after the server has stopped (e.g. a servicer's
            background thread).
        interceptors: more server interceptors, run after authentication (e.g.
            the metrics' latency timer).

    Raises:
        ValueError: no token and not ``insecure``, or a bad limit.
        OSError: a TLS file cannot be read.
        RuntimeError: the address cannot be bound.
    """
    security.require_auth_choice()
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers!r} must be at least 1")
    if not 0 <= port < 65536:
        raise ValueError(f"port={port!r} must be in [0, 65535] (0 picks a free one)")
    auth = [] if security.token is None else [AuthInterceptor(security.token)]
    interceptors = [*auth, *interceptors]
    if security.token is None:
        logger.warning(
            "serving on %s without authentication (--insecure-no-auth)", host
        )

    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="grpc-server"
        ),
        interceptors=interceptors,
        options=grpc_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    bound = _bind(server, host, port, security)
    server.start()
    running = RunningServer(server, host, bound, health_servicer, on_stop)
    logger.info(
        "serving %s on %s (%s, %s)",
        ", ".join(service_names) or "gRPC",
        running.address,
        "TLS" if security.tls_cert is not None else "plaintext",
        "token" if security.token is not None else "no authentication",
    )
    return running


def _bind(server: grpc.Server, host: str, port: int, security: ServerSecurity) -> int:
    address = format_address(host, port)
    try:
        if security.tls_cert is None:
            bound = server.add_insecure_port(address)
        else:
            key = Path(security.tls_key).read_bytes()
            cert = Path(security.tls_cert).read_bytes()
            credentials = grpc.ssl_server_credentials([(key, cert)])
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise RuntimeError(
            f"cannot bind {address}: {error}; is the port in use?"
        ) from error
    if bound == 0:
        raise RuntimeError(f"cannot bind {address}; is the port in use?")
    return bound


# --- client -------------------------------------------------------------------


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Add ``authorization: Bearer <token>`` to every outgoing call."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in details.metadata or () if m[0] != "authorization"]
        return _CallDetails(details, [*metadata, self._entry])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation, client_call_details, request_iterator
    ):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation, client_call_details, request_iterator
    ):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    address: str,
    security: ClientSecurity | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """Open a channel to a ccdni server; the token rides on every call.

    The channel connects lazily and reconnects on its own (retrying a lost
    server about once a second); pair it with ``wait_ready`` and ``call``.

    Args:
        address: ``host:port`` as printed by the server.
        security: token and TLS settings; ``None`` is plaintext without a token.
        max_message_bytes: send and receive limit; the server must use the same.

    Raises:
        OSError: the root certificate cannot be read.
    """
    security = security or ClientSecurity()
    options = grpc_options(max_message_bytes) + _RECONNECT_OPTIONS
    if security.tls_root_cert is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        root = Path(security.tls_root_cert).read_bytes()
        if security.server_name_override is not None:
            options.append(
                ("grpc.ssl_target_name_override", security.server_name_override)
            )
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
        channel = grpc.secure_channel(address, credentials, options=options)
    if security.token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenInterceptor(security.token))


def wait_ready(channel: grpc.Channel, timeout: float = DEFAULT_DEADLINE_S) -> None:
    """Block until ``channel`` has connected.

    Raises:
        TimeoutError: it did not connect within ``timeout`` seconds (server down,
            wrong address, or a TLS handshake that fails).
    """
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError as error:
        raise TimeoutError(
            f"channel not ready after timeout={timeout} s; is the server up, and "
            "do address and TLS settings match it?"
        ) from error


def call(
    fn: Callable[..., ResponseT],
    request: Any,
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    retries: int = 3,
    backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> ResponseT:
    """Call a stub method with a deadline, retrying transient failures.

    Each attempt gets ``deadline_s``. UNAVAILABLE and DEADLINE_EXCEEDED are
    retried up to ``retries`` times, sleeping ``backoff_s * 2**attempt`` (capped
    at ``max_backoff_s``) times a random factor in [0.5, 1] between attempts, so
    that many clients do not retry in step. Every other code is raised at once.

    A client-streaming ``request`` (an iterator) cannot be replayed: pass
    ``retries=0`` for it.

    Args:
        fn: a stub method, e.g. ``stub.Predict``.
        request: its request message (or request iterator).
        deadline_s: deadline of each attempt, in seconds.
        retries: further attempts after the first.
        backoff_s: sleep before the first retry.
        max_backoff_s: longest sleep between attempts.
        metadata: extra metadata for the call.

    Raises:
        grpc.RpcError: the last attempt's error.
        ValueError: a negative or zero setting.
    """
    if deadline_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
        raise ValueError(
            f"deadline_s={deadline_s!r} must be positive and retries={retries!r}, "
            f"backoff_s={backoff_s!r}, max_backoff_s={max_backoff_s!r} "
            "non-negative"
        )

    for attempt in range(retries + 1):
        try:
            return fn(request, timeout=deadline_s, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code()
            if code not in RETRYABLE_CODES or attempt == retries:
                raise
            delay = min(max_backoff_s, backoff_s * 2**attempt)
            delay *= random.uniform(0.5, 1.0)
            logger.debug(
                "attempt %d of %d failed with %s; retrying in %.3f s",
                attempt + 1,
                retries + 1,
                code.name,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


# --- standalone entry points --------------------------------------------------


def add_standalone_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the network and security flags every ``python -m <service>`` takes."""
    group = parser.add_argument_group("network and security")
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)",
    )
    group.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to bind; 0 picks a free one (default). The bound host:port is "
        "the first line on stdout",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token callers must send (else ${TOKEN_ENV})",
    )
    group.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="accept calls without a token (loopback experiments only)",
    )
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain")
    group.add_argument("--tls-key", type=Path, help="PEM private key")
    group.add_argument(
        "--max-message-mb",
        type=float,
        default=MAX_MESSAGE_BYTES / 2**20,
        help="gRPC message limit in MiB, both directions (default %(default)g)",
    )


def security_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerSecurity:
    """The ``ServerSecurity`` the standalone flags describe.

    The token comes from ``--token-file`` (surrounding whitespace stripped),
    else from the ``CCDNI_TOKEN`` environment variable.

    Raises:
        ValueError: the token file cannot be read or is empty, or the flags
            contradict each other.
    """
    environ = os.environ if environ is None else environ
    token = None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as error:
            raise ValueError(
                f"--token-file {args.token_file}: cannot be read ({error})"
            ) from error
        if not token:
            raise ValueError(f"--token-file {args.token_file}: is empty")
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()

    return ServerSecurity(
        token=token,
        insecure=args.insecure_no_auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def message_bytes_from_args(args: argparse.Namespace) -> int:
    """``--max-message-mb`` in bytes.

    Raises:
        ValueError: not in (0, 2048) MiB.
    """
    size = int(args.max_message_mb * 2**20)
    if not 0 < size < 2**31:
        raise ValueError(
            f"--max-message-mb {args.max_message_mb}: expected a value in (0, 2048)"
        )
    return size


def serve_forever(server: RunningServer, *, grace: float = 5.0) -> None:
    """Announce the server and block until SIGTERM or SIGINT, then stop it.

    The first line on stdout is the bound ``host:port`` (flushed), so a parent
    process can start the server with ``--port 0`` and read where it is. On a
    signal the server stops gracefully (``RunningServer.stop(grace)``). Call from
    the main thread.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        # The one line of stdout a standalone server writes: where it listens.
        print(server.address, flush=True)
        while not stop.wait(timeout=1.0):
            pass
    finally:
        server.stop(grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- bad input ----------------------------------------------------------------


class Counters:
    """Thread-safe named counters (a servicer's statistics)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        """Args: names: counters that exist (at zero) from the start."""
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, name: str, amount: float = 1) -> None:
        """Add ``amount`` to counter ``name`` (created at zero if new)."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> float:
        """The value of ``name``; 0 for a counter never added to."""
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._values)


class RequestError(Exception):
    """Bad input, to be answered with ``code`` and ``message``.

    Attributes:
        code: the gRPC status code (INVALID_ARGUMENT, NOT_FOUND, ...).
        message: what is wrong, naming the field and the expected value.
        reason: short counter key (``dtype``, ``width``, ``not_finite`` ...);
            defaults to the code's name in lower case.
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str | None = None
    ) -> None:
        super().__init__(code, message, reason)
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def reject(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    counters: Counters | None = None,
    reason: str | None = None,
) -> NoReturn:
    """End a call with a specific status, counting it as ``rejected.<reason>``.

    Call it before changing any state, so that a rejected call leaves none.

    Raises:
        Exception: always (``context.abort`` ends the call by raising).
    """
    reason = reason or code.name.lower()
    if counters is not None:
        counters.add(f"rejected.{reason}")
    if len(message) > _MAX_DETAILS_CHARS:
        message = message[: _MAX_DETAILS_CHARS - 3] + "..."
    logger.debug("rejected (%s): %s", reason, message)
    context.abort(code, message)


def reject_error(
    context: grpc.ServicerContext,
    error: RequestError,
    counters: Counters | None = None,
) -> NoReturn:
    """``reject`` with the code, message and reason of a ``RequestError``."""
    reject(context, error.code, error.message, counters, error.reason)
