"""Exceptions raised for libferry's status codes (``ferry_status_t`` in ``include/ferry/ferry.h``).

Argument checks in the Python layer (shape, dtype, stride, device of a tensor) raise ``ValueError``
naming the argument before anything reaches the library. Errors the library reports raise a
``FerryError`` subclass carrying ``status`` (a :class:`Status`) and ``message``, the library's text,
which names the rank, the peer and the operation.
"""

from __future__ import annotations

import enum
import re

from ferry import _ferry


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    TIMEOUT = 2
    PEER_FAILED = 3
    TRANSPORT = 4
    OUT_OF_MEMORY = 5
    UNSUPPORTED = 6
    INTERNAL = 7


class FerryError(RuntimeError):
    """A libferry call failed; ``status`` says how and ``message`` is the library's text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} [{_ferry.status_string(int(status))}]")
        self.status = Status(status)
        self.message = message


    @property
    def ranks(self) -> list[int]:
        """Every rank the library's message names, in order of appearance (this rank included)."""
        return [int(r) for r in re.findall(r"\branks? (\d+)", self.message)]

    def __reduce__(self):
        # Crosses process boundaries (multiprocessing) as itself, not as a bare RuntimeError.
        return (type(self), (int(self.status), self.message))


class FerryInvalidArgument(FerryError, ValueError):
    """The library refused an argument or a configuration (also a ``ValueError``)."""


class FerryPeerFailed(FerryError):
    """A peer failed, disconnected, or sent bytes that do not pass the checks; the message names it.

    A wait that passed its deadline for named peers (a killed or hung process: neither tcp nor shm
    reports a dead peer by itself) raises :class:`FerryPeerTimeout`, which is one too.
    """


class FerryTimeout(FerryError):
    """A wait passed its deadline. When the library names the peers it waited for, the exception
    is a :class:`FerryPeerTimeout` (also a :class:`FerryPeerFailed`); ``status`` stays TIMEOUT."""

    def __new__(cls, status: int = int(Status.TIMEOUT), message: str = "", *args: object):
        if cls is FerryTimeout and _MISSING_PEER.search(message):
            cls = FerryPeerTimeout
        return super().__new__(cls, status, message, *args)


class FerryPeerTimeout(FerryTimeout, FerryPeerFailed):
    """Named peers did not arrive within the deadline: ``ranks`` lists them (after this rank)."""


# How libferry's waits name the peers they still expect.
_MISSING_PEER = re.compile(r"from rank \d+\)?: \d+ of \d+ missing|did not arrive|disconnected")


class FerryTransportError(FerryError):
    """libfabric (or the bootstrap's transport) reported an error."""


class FerryOutOfMemory(FerryError, MemoryError):
    """Host or device memory for the buffers could not be allocated or registered."""


class FerryUnsupported(FerryError, NotImplementedError):
    """The configuration is valid but this build or this machine cannot run it."""


class FerryInternalError(FerryError):
    """A state the library does not expect, e.g. a call after a failed step."""


_BY_STATUS = {
    Status.INVALID_ARGUMENT: FerryInvalidArgument,
    Status.TIMEOUT: FerryTimeout,
    Status.PEER_FAILED: FerryPeerFailed,
    Status.TRANSPORT: FerryTransportError,
    Status.OUT_OF_MEMORY: FerryOutOfMemory,
    Status.UNSUPPORTED: FerryUnsupported,
    Status.INTERNAL: FerryInternalError,
}

_ferry.set_error_types({int(s): cls for s, cls in _BY_STATUS.items()})


def error_type(status: int) -> type[FerryError]:
    """The exception class raised for a ``ferry_status_t`` value."""
    return _BY_STATUS.get(Status(status), FerryError)
