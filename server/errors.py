"""The service's errors, and the one table that maps them to gRPC status codes.

Every layer of the server (store, auth, control loop, servicers) raises these
plain exceptions, or the solver's :class:`solver.ValidationError`; only the
servicers' error boundary (``server.service``) turns them into a gRPC status,
through :data:`STATUS_CODES`. Responses never carry a success flag: a call
either returns its message or fails with one of these codes.

=========================  ====================  ===================================
exception                  gRPC code             when
=========================  ====================  ===================================
solver.ValidationError     INVALID_ARGUMENT      bad input: one field violation per
                                                 bad field, the CLI's messages
NotFound                   NOT_FOUND             no workload / node with that id
AlreadyExists              ALREADY_EXISTS        a workload id that is taken
FailedPrecondition         FAILED_PRECONDITION   valid, but not in this state (cancel
                                                 a finished workload, a compacted
                                                 Watch revision)
Unauthenticated            UNAUTHENTICATED       no token, or an unknown one
PermissionDenied           PERMISSION_DENIED     not admin, or another tenant's data
ResourceExhausted          RESOURCE_EXHAUSTED    too many requests (rate limit)
Unavailable                UNAVAILABLE           a service with no live replica to
                                                 answer (Inference.Generate); a
                                                 solver process that died
DeadlineExceeded           DEADLINE_EXCEEDED     a solve killed past its deadline
Cancelled                  CANCELLED             a solve stopped: its caller left
Upstream                   its ``code``          a replica's own error, passed on
=========================  ====================  ===================================

A request larger than the server's message limit is refused by gRPC itself,
also with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc

import solver


class ServiceError(Exception):
    """Base of the service's errors; ``str(exc)`` is the message the client sees."""


class NotFound(ServiceError):
    pass


class AlreadyExists(ServiceError):
    pass


class FailedPrecondition(ServiceError):
    pass


class Unauthenticated(ServiceError):
    pass


class PermissionDenied(ServiceError):
    pass


class ResourceExhausted(ServiceError):
    pass


class Unavailable(ServiceError):
    pass


class DeadlineExceeded(ServiceError):
    pass


class Cancelled(ServiceError):
    pass


class Upstream(ServiceError):
    """An error a replica answered, passed on to the caller with its code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    solver.ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
}


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a known error (by the table, most specific class first), else None."""
    if isinstance(exc, Upstream):
        return exc.code
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return None
