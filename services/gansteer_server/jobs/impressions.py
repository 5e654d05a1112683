"""Impressions tables in Redis: per shown image, how often it was shown and how often people interacted with it.

    impressions:{dataset}        list  one serialized ImpressionRecord per shown image, append-only, oldest first
    impressions:{dataset}:keys   set   idempotency keys already recorded for this table

Nothing here changes or removes a record: a table only grows, so its first N records never change and a job that
noted N at submission trains on exactly those (`PIREstimatorSpec`). Records carry their provenance (reporter, time
of receipt, `api` or `job:<id>`), written by the caller of `append` (the service or a job), never by the reporter.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence

import redis

from gansteer_server.jobs.celery_app import open_redis
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import validation
from gansteer_server.wire.errors import invalid_argument

DATASET = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ImpressionStore:
    """Appends records to a table and reads them back; one Redis transaction per append."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    @classmethod
    def open(cls, settings: JobSettings) -> ImpressionStore:
        """A store on the deployment's Redis; one client per URL and process (parsing a spec opens one too)."""
        return cls(_client(settings.settings.redis_url), settings.key_prefix)

    def key(self, dataset: str) -> str:
        return f"{self.prefix}impressions:{dataset}"

    def append(
        self, dataset: str, records: Sequence[opt.ImpressionRecord], idempotency_key: str = ""
    ) -> tuple[int, int, bool]:
        """Appends `records` (already validated) to `dataset`: (recorded, total after, duplicate). With a key seen
        before for this table, nothing is appended and `duplicate` is True."""
        key, keys_key = self.key(dataset), f"{self.key(dataset)}:keys"
        pipe = self.client.pipeline(transaction=True)
        while True:
            try:
                pipe.watch(key, keys_key)
                if idempotency_key and pipe.sismember(keys_key, idempotency_key):
                    pipe.reset()
                    return 0, int(self.client.llen(key)), True
                pipe.multi()
                if records:
                    pipe.rpush(key, *(record.SerializeToString() for record in records))
                if idempotency_key:
                    pipe.sadd(keys_key, idempotency_key)
                pipe.llen(key)
                total = int(pipe.execute()[-1])
                return len(records), total, False
            except redis.WatchError:
                continue

    def count(self, dataset: str) -> int:
        return int(self.client.llen(self.key(dataset)))

    def read(self, dataset: str, offset: int = 0, limit: int | None = None) -> list[opt.ImpressionRecord]:
        """Records offset .. offset + limit - 1 (all from offset when limit is None), oldest first."""
        end = -1 if limit is None else offset + limit - 1
        if limit is not None and limit <= 0:
            return []
        return [opt.ImpressionRecord.FromString(data) for data in self.client.lrange(self.key(dataset), offset, end)]


@functools.lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return open_redis(url)


def now_timestamp() -> tuple[int, int]:
    """(seconds, nanos) of the current time, for `received_at`."""
    now = time.time_ns()
    return now // 1_000_000_000, now % 1_000_000_000


#: What `check_records` needs to pin a generator version: `SubmitContext.model` (NOT_FOUND naming the field).
ModelLookup = Callable[[common_pb2.ModelRef, str, tuple[str, ...]], ModelCard]
MAX_RECORDS = 10_000
_MAX_TEXT = 256


def check_records(
    records: Sequence[opt.ImpressionRecord], model: ModelLookup, reporter: str, source: str
) -> tuple[str, list[opt.ImpressionRecord]]:
    """The records' one table and the records as stored: generator versions pinned, provenance stamped. A bad record
    refuses all (INVALID_ARGUMENT naming `records[i].<field>`, NOT_FOUND for an unknown generator version)."""
    if not records:
        raise invalid_argument("records", "at least one record is required")
    if len(records) > MAX_RECORDS:
        raise invalid_argument("records", f"at most {MAX_RECORDS} records per request, got {len(records)}")
    dataset = records[0].dataset
    seconds, nanos = now_timestamp()
    stored: list[opt.ImpressionRecord] = []
    for index, record in enumerate(records):
        field = f"records[{index}]"
        if not DATASET.fullmatch(record.dataset):
            raise invalid_argument(f"{field}.dataset", f"{record.dataset!r} is not 1-64 letters, digits, '-', '_', '.'")
        if record.dataset != dataset:
            raise invalid_argument(f"{field}.dataset", f"one table per request: {record.dataset!r} after {dataset!r}")
        if record.impressions < 0:
            raise invalid_argument(f"{field}.impressions", f"must be >= 0, got {record.impressions}")
        if record.interactions < 0:
            raise invalid_argument(f"{field}.interactions", f"must be >= 0, got {record.interactions}")
        if record.interactions > record.impressions:
            raise invalid_argument(
                f"{field}.interactions",
                f"{record.interactions} interactions exceed the {record.impressions} impressions",
            )
        for name in ("image_id", "cohort"):
            if len(getattr(record, name)) > _MAX_TEXT:
                raise invalid_argument(f"{field}.{name}", f"at most {_MAX_TEXT} characters")
        card = model(record.generator, f"{field}.generator", ("generator",))
        if record.HasField("latent"):
            validation.tensor(record.latent, f"{field}.latent", shape=(card.latent_size,))
        if card.num_classes and not record.HasField("class_id"):
            raise invalid_argument(f"{field}.class_id", f"{card.ref} is class-conditional: give the image's class")
        if record.HasField("class_id") and not 0 <= record.class_id < (card.num_classes or 0):
            raise invalid_argument(
                f"{field}.class_id", f"{record.class_id} is outside {card.ref}'s {card.num_classes or 0} classes"
            )
        copy = opt.ImpressionRecord()
        copy.CopyFrom(record)
        copy.generator.CopyFrom(common_pb2.ModelRef(name=card.name, version=card.version))
        copy.reporter, copy.source = reporter, source
        copy.received_at.seconds, copy.received_at.nanos = seconds, nanos
        if not record.HasField("time"):
            copy.time.CopyFrom(copy.received_at)
        stored.append(copy)
    return dataset, stored
