"""Serving on grpc's asyncio server, so that an open stream holds no thread.

grpc's thread-pool server gives every call a thread for its whole life: 32 open
streams (workers' ``Connect``, tenants' ``Watch``) took every thread and hung
the server (hardening, issue 15 item 3). Here one thread runs an event loop
with ``grpc.aio``:

* the long-lived streams (``Watch``, ``Logs``, ``Connect``) are coroutines that
  wait on a :class:`Wakeup`, fired from whichever thread changed something (the
  store's writer, a worker's log line, the dispatcher's launches);
* the blocking handlers (every unary call: they read and write SQLite, solve,
  proxy an inference request) run in a bounded thread pool and see their call
  through a :class:`CallContext` (:func:`blocking_unary`); a call its client
  cancels or lets time out is seen as no longer active there;
* the checkpoint transfers (streams that last as long as a file) stay blocking
  handlers, which ``grpc.aio`` runs in the same pool.

:class:`EventLoop` owns the thread and its loop; :class:`Registrar` stands for
the server when generated ``add_*Servicer_to_server`` functions register a
servicer, wrapping each handler as above and making malformed request bytes an
:class:`Undecodable` request (answered INVALID_ARGUMENT, not INTERNAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent import futures
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

T = TypeVar("T")


TICK_S = 0.1  # of the loop's own heartbeat (see EventLoop.clock)


class EventLoop:
    """An asyncio loop in a thread of its own; other threads hand it coroutines."""

    def __init__(self, name: str = "apportion-aio") -> None:
        self.loop = asyncio.new_event_loop()
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(self._tick())
        self.loop.run_forever()

    async def _tick(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(TICK_S)

    def clock(self) -> float:
        """``time.monotonic()``, except that it stands still while the loop is behind.

        A tick scheduled behind the messages already received runs only after them, so
        a silence measured on this clock is the peer's, not the server's: a worker
        whose heartbeats wait in a loop that is busy (4,000 registering at once, each
        an event for 100 watches) is not declared lost for it.
        """
        return min(time.monotonic(), self._last_tick + TICK_S)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop (its remaining tasks are cancelled) and join its thread."""
        if self.loop.is_closed():
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Wakeup:
    """ "Something changed": fired from any thread, awaited by coroutines of one loop.

    A waiter takes a :meth:`ticket` *before* it looks for what it waits for, then
    awaits it with :func:`wait`: a change between the look and the wait sets that
    ticket, so no change is missed. Fires are coalesced (one callback in flight),
    and a Wakeup no coroutine has waited on yet costs a fire nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._pending = False

    def ticket(self) -> asyncio.Event:
        """The event the next fire sets (call on the loop)."""
        with self._lock:
            if self._event is None:
                self._loop = asyncio.get_running_loop()
                self._event = asyncio.Event()
            return self._event

    def fire(self) -> None:
        """Wake every coroutine waiting now (from any thread)."""
        with self._lock:
            loop = self._loop
            if loop is None or self._pending:
                return
            self._pending = True
        if _running_loop() is loop:  # on the loop itself (a heartbeat's lease): no self-pipe write
            loop.call_soon(self._set)
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        with self._lock:
            self._pending = False
            event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def wait(ticket: asyncio.Event, timeout: float) -> bool:
    """Wait for ``ticket`` at most ``timeout`` seconds; whether it was set. (With
    ``asyncio.timeout``, not ``wait_for``: no task per wait, and thousands of streams
    wait at once; every object they keep is one the garbage collector scans.)"""
    try:
        async with asyncio.timeout(timeout):
            await ticket.wait()
    except TimeoutError:
        return False
    return True


class Outbox(Generic[T]):
    """Messages put from any thread and taken by a coroutine (a stream's sender), which
    awaits a :meth:`Wakeup.ticket` of :attr:`wakeup` while it is empty."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self.wakeup = Wakeup()

    def put(self, item: T) -> None:
        self._items.append(item)
        self.wakeup.fire()

    def take(self) -> T | None:
        """The oldest message, or None when there is none."""
        try:
            return self._items.popleft()
        except IndexError:
            return None


# ----------------------------------------------------------------------------- blocking handlers


class Aborted(Exception):
    """Raised by :meth:`CallContext.abort` in a handler's thread: the call ends with a status."""


class CallContext:
    """What a blocking handler sees of its call: the part of ``grpc.ServicerContext`` this
    project uses, safe to use from the handler's thread."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._metadata = tuple(context.invocation_metadata() or ())
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._ended = threading.Event()
        self.status: tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]] | None = None

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the client has cancelled, the deadline has passed or the call has ended."""
        return not self._ended.is_set()

    def end(self) -> None:
        self._ended.set()

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.status = (code, details, tuple(trailing_metadata or ()))
        raise Aborted(details)


def blocking_unary(
    behaviour: Callable[[Any, Any], Any], pool: futures.Executor
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """A unary-unary handler that runs the blocking ``behaviour`` in ``pool``."""

    @functools.wraps(behaviour)
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = CallContext(context)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, behaviour, request, call)
        except Aborted:
            assert call.status is not None
            await context.abort(*call.status)
        finally:
            call.end()  # also when the client cancelled: the task is cancelled here

    return handler


# ----------------------------------------------------------------------------- registration


class Undecodable:
    """A request whose bytes are not a valid message (put where the request would be by
    :class:`Registrar`); the servicer answers INVALID_ARGUMENT, not gRPC's INTERNAL."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "cannot be parsed")

    return deserialize


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serializer(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serializer


def _is_async(behaviour: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


class Registrar:
    """Stands for the ``grpc.aio`` server when a generated ``add_*Servicer_to_server``
    registers a servicer: blocking unary handlers run in ``pool`` (:func:`blocking_unary`),
    coroutine handlers on the loop, blocking streams in the server's own thread pool;
    unary requests get deserializers that turn malformed bytes into :class:`Undecodable`;
    and a handler may answer with bytes it serialized itself (``Watch`` serializes an
    event once for all its watchers)."""

    def __init__(self, server: grpc.aio.Server, pool: futures.Executor) -> None:
        self._server = server
        self._pool = pool

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: :meth:`add_registered_method_handlers` registers the wrapped ones."""

    def _wrap(self, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        h = h._replace(response_serializer=_passing_bytes(h.response_serializer))
        if h.request_streaming:
            return h
        h = h._replace(request_deserializer=_tolerant(h.request_deserializer))
        if h.unary_unary is not None and not _is_async(h.unary_unary):
            h = h._replace(unary_unary=blocking_unary(h.unary_unary, self._pool))
        return h

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {name: self._wrap(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
