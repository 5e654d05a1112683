"""The steps an operation of `gansteer._core` yields, and what it is sent back for each: the whole vocabulary
between the operations, written once, and the two clients that perform them (blocking and asyncio).

`Call`: one unary RPC; its reply. `Stream`: the next message of a server stream; the message, None once it ended.
`Sleep`: a pause; None. `Await`: an awaitable (an async rater's answer); its value. `Emit`: a value the operation
hands to whoever iterates it; None. A failed call is not sent back: its `gansteer.errors` exception is thrown in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeAlias, TypeVar

T = TypeVar("T")
Service: TypeAlias = Literal["generation", "scoring", "optimization"]


@dataclass(frozen=True, eq=False)
class Call:
    """One unary RPC; `timeout` None: the client's deadline."""

    service: Service
    method: str
    request: Any
    timeout: float | None = None


@dataclass(frozen=True, eq=False)
class Stream:
    """The next message of a server stream, None once it has ended. The stream opens when first asked for and stays
    open across other steps; another Stream object opens another stream (and closes this one)."""

    service: Service
    method: str
    request: Any
    timeout: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Await:
    """A value to await (an async rater's answer); only the asyncio client can perform it."""

    awaitable: Awaitable[Any]


@dataclass(frozen=True)
class Emit(Generic[T]):
    value: T


Step: TypeAlias = Call | Stream | Sleep | Await
Steps: TypeAlias = Generator[Step | Emit[Any], Any, T]
"""An operation: its steps, then its value."""
Feed: TypeAlias = Generator[Step | Emit[T], Any, None]
"""An iteration: its steps and the values it emits."""
Handler: TypeAlias = Callable[[T], bool | Steps[bool]]
"""Sees one value (an event, a round); may take steps; returns True to stop."""


def settle(operation: Steps[T]) -> Feed[T]:
    """An operation as an iteration that emits its value once, so one driver loop performs both."""
    yield Emit((yield from operation))
