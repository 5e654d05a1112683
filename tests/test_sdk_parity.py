"""The blocking and the asyncio client offer the same calls: every public method of `Client` and `Job` exists on
`AsyncClient` and `AsyncJob` (and the other way round) with the same parameters, defaults and types, as a coroutine,
or as an async iterator where the blocking one returns an iterator. Both perform the same operations of
`gansteer._core`, so a method here is all a new call needs on each side."""

from __future__ import annotations

import inspect
import re

import pytest

from gansteer import AsyncClient, AsyncJob, AsyncRound, Client, Job, Round

PAIRS = [(Client, AsyncClient), (Job, AsyncJob), (Round, AsyncRound)]
# Deliberate differences, with their reason. Async code rarely owns the terminal: no progress bar by default.
ALLOWED = {("wait", "progress"): (True, False)}


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") or name == "__init__"
    }


def blocking(annotation: object) -> str:
    """An annotation with its asyncio spelling made blocking: AsyncJob -> Job, AsyncIterator -> Iterator,
    Awaitable[X] -> X."""
    text = re.sub(r"\bAsync(?=[A-Z])", "", str(annotation))
    while (start := text.find("Awaitable[")) >= 0:
        depth, end = 1, start + len("Awaitable[")
        while depth:
            depth += {"[": 1, "]": -1}.get(text[end], 0)
            end += 1
        end -= 1  # the closing bracket
        text = text[:start] + text[start + len("Awaitable[") : end] + text[end + 1 :]
    return text


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_the_same_methods_with_the_same_signatures(sync: type, aio: type) -> None:
    ours, theirs = public_methods(sync), public_methods(aio)
    assert sorted(ours) == sorted(theirs), f"{sync.__name__} and {aio.__name__} differ in their methods"
    for name, signature in ours.items():
        other = theirs[name]
        assert list(signature.parameters) == list(other.parameters), f"{name}: parameters differ"
        for param, mine in signature.parameters.items():
            its = other.parameters[param]
            assert mine.kind == its.kind, f"{name}({param}): kind differs"
            defaults = (mine.default, its.default)
            assert defaults[0] == defaults[1] or ALLOWED.get((name, param)) == defaults, f"{name}({param}): default"
            assert blocking(mine.annotation) == blocking(its.annotation), f"{name}({param}): type differs"
        assert blocking(signature.return_annotation) == blocking(other.return_annotation), f"{name}: return type"


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_async_methods_are_coroutines_or_async_iterators(sync: type, aio: type) -> None:
    for name, signature in public_methods(sync).items():
        method = getattr(aio, name)
        if name == "__init__":
            continue
        if str(signature.return_annotation).startswith("Iterator["):
            assert not inspect.iscoroutinefunction(method), f"{aio.__name__}.{name} must be an async iterator"
            assert str(inspect.signature(method).return_annotation).startswith("AsyncIterator[")
        else:
            assert inspect.iscoroutinefunction(method), f"{aio.__name__}.{name} must be a coroutine function"


def test_the_issue_s_examples_are_covered() -> None:
    """What issue 11 found missing on the asyncio side is there now."""
    assert {"spec", "targets", "rounds", "feedback", "answer_rounds"} <= set(public_methods(AsyncJob))
    assert {"get_job_spec", "job_kinds", "optimizers", "interactions"} <= set(public_methods(AsyncClient))
