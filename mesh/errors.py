"""Typed errors: each carries its gRPC status code and whether a retry elsewhere may succeed."""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Root of every error the mesh raises on purpose; mapped to a status by one interceptor."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"model_name: model '{name}' is not found")
        self.name = name


class VersionNotFound(NotFound):
    def __init__(self, name: str, version: int | str) -> None:
        super().__init__(f"model_version: version '{version}' of model '{name}' is not found")
        self.name = name
        self.version = version


class InvalidVersion(InvalidArgument):
    """A request's version string is neither a version number (an int64 in ASCII digits) nor an alias."""

    def __init__(self, name: str, version: str) -> None:
        shown = version if len(version) <= 40 else f"{version[:20]}...({len(version)} characters)"
        super().__init__(
            f"model_version: {shown!r} is neither a version number nor an alias of model '{name}'"
        )
        self.name = name
        self.version = version


class AlreadyExists(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class IntegrityError(FailedPrecondition):
    """An artifact's bytes do not match the sha256 recorded for it."""


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(MeshError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The status code with this wire number (`StatusCode.X.value[0]`); UNKNOWN for any other number."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def error_for_code(code: grpc.StatusCode, message: str) -> MeshError:
    """The typed error for a status code (INTERNAL for codes without a dedicated class)."""
    return _BY_CODE.get(code, Internal)(message)


def from_rpc_error(err: grpc.RpcError) -> MeshError:
    """Turns an upstream status back into the typed error, so codes survive a hop unchanged."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for_code(code, details or str(code))
