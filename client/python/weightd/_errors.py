"""WeightdError and one subclass per status code of the C ABI (the absl::StatusCode numbers)."""

CODE_NAMES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


class WeightdError(Exception):
    """An error from the daemon or the client library.

    Attributes: `code` (int, the absl::StatusCode number), `code_name` ("NOT_FOUND", ...) and
    `message` (the daemon's or library's message, naming what to fix).
    """

    code = 2

    def __init__(self, code, message):
        self.code = code
        self.code_name = CODE_NAMES.get(code, str(code))
        self.message = message
        super().__init__(f"{self.code_name}: {message}")


class CancelledError(WeightdError):
    """An update cancelled (unload --force, shutdown) before it was published."""
    code = 1


class InvalidArgumentError(WeightdError):
    code = 3


class DeadlineExceededError(WeightdError):
    code = 4


class NotFoundError(WeightdError):
    code = 5


class AlreadyExistsError(WeightdError):
    code = 6


class PermissionDeniedError(WeightdError):
    code = 7


class ResourceExhaustedError(WeightdError):
    code = 8


class FailedPreconditionError(WeightdError):
    code = 9


class OutOfRangeError(WeightdError):
    code = 11


class UnimplementedError(WeightdError):
    code = 12


class InternalError(WeightdError):
    code = 13


class UnavailableError(WeightdError):
    """No daemon answers on the socket, or the connection was lost."""
    code = 14


class DataLossError(WeightdError):
    code = 15


_BY_CODE = {c.code: c for c in (CancelledError, InvalidArgumentError, DeadlineExceededError,
                                  NotFoundError, AlreadyExistsError,
                                  PermissionDeniedError, ResourceExhaustedError,
                                  FailedPreconditionError, OutOfRangeError, UnimplementedError,
                                  InternalError, UnavailableError, DataLossError)}


def error_from_code(code, message):
    return _BY_CODE.get(code, WeightdError)(code, message)
