"""Which failures of a Triton gRPC call are worth another try, how long to wait first, and how they read.

``tritonclient`` raises one exception type (``InferenceServerException``) for every failure; what happened is
in its gRPC status (``status()`` returns e.g. ``"StatusCode.UNAVAILABLE"``). The runner retries only what a
server that is (re)starting or shedding load would answer; a deadline that ran out is not retried, since the
server is slow, not gone, and a retry would add to its load.
"""

from __future__ import annotations

#: retried: the server is (re)starting or (re)loading the model (NOT_FOUND: the model was there at
#: construction), or it sheds load
TRANSIENT_STATUS = (
    "StatusCode.UNAVAILABLE",
    "StatusCode.NOT_FOUND",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
)
#: after these the server may have restarted: check the model again and re-register shared memory
RESTART_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")
DEADLINE_STATUS = "StatusCode.DEADLINE_EXCEEDED"
#: the wait before retry 1, 2, 3 ...; the last one repeats
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


def grpc_status(exc: BaseException) -> str:
    """The gRPC status of a Triton client error (``"StatusCode.UNAVAILABLE"``), or "" when it has none."""
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def is_transient(exc: BaseException) -> bool:
    """A failure that may be gone by the next try: the server restarts, reloads the model or sheds load."""
    return grpc_status(exc) in TRANSIENT_STATUS


def server_may_have_restarted(exc: BaseException) -> bool:
    """After such a failure the served model must be checked again and shared memory registered again."""
    return grpc_status(exc) in RESTART_STATUS


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retrying a call whose attempt number ``attempt`` (from 0) failed."""
    return RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]


def describe_error(exc: BaseException) -> str:
    """``"UNAVAILABLE: failed to connect ..."``: the status without its prefix, then the server's message."""
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    status = grpc_status(exc)
    return f"{status.replace('StatusCode.', '')}: {text}" if status else str(text)
