"""What the blocking and the asyncio client share about reaching the services: addresses, channel options,
credentials in metadata, and the backoff between retries."""

from __future__ import annotations

import random

DEFAULT_TARGET = "localhost:50053"
# The ports `gansteer up` and the server settings use when the client is left at its default target.
DEFAULT_GENERATION_TARGET = "localhost:50051"
DEFAULT_SCORING_TARGET = "localhost:50052"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def resolve_targets(target: str, generation_target: str | None, scoring_target: str | None) -> tuple[str, str, str]:
    """(generation, scoring, optimization) addresses.

    An unset generation or scoring target means `target` serves every service (a gateway), except that the
    default target pairs with the default local ports, so `Client()` reaches a stack started by `gansteer up`.
    """
    local = target == DEFAULT_TARGET
    return (
        generation_target or (DEFAULT_GENERATION_TARGET if local else target),
        scoring_target or (DEFAULT_SCORING_TARGET if local else target),
        target,
    )


def backoff_delay(attempt: int, *, initial: float = 0.1, maximum: float = 5.0) -> float:
    """Seconds to wait before retry `attempt` (0-based): doubling from `initial`, capped, with jitter so many
    clients that lost the same server do not come back in step."""
    return min(maximum, initial * 2.0**attempt) * random.uniform(0.5, 1.0)


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the API key as a bearer token, or nothing."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
