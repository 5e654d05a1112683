"""What every job kind's spec builder shares: the option groups most kinds take (job settings, optimizer, budget),
their wire messages, and the check that refuses an option the kind does not have.

A builder sends only what the caller set; everything left unset takes the server's default, so the SDK never holds
a second copy of the defaults (a preset's weights, an optimiser's step size) that could drift from the server's.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypedDict

from google.protobuf import struct_pb2  # type: ignore[import-untyped]
from google.protobuf.descriptor import FieldDescriptor  # type: ignore[import-untyped]

from gansteer._specs import _invalid
from gansteer.types import JobResult
from gansteer.v1 import optimization_pb2

BudgetUnit: TypeAlias = Literal["iterations", "generator_calls"]
Backend: TypeAlias = Literal["local", "remote"]

_BUDGET_UNITS = {
    "iterations": optimization_pb2.BUDGET_UNIT_ITERATIONS,
    "generator_calls": optimization_pb2.BUDGET_UNIT_GENERATOR_CALLS,
}
_BACKENDS = {"local": optimization_pb2.BACKEND_LOCAL, "remote": optimization_pb2.BACKEND_REMOTE}


@dataclass(frozen=True)
class Kind:
    """What the SDK knows of one job kind: its JobSpec field, the client method that submits it, the names of its
    options, and the type its results come back as."""

    name: str
    method: str
    options: frozenset[str]
    result: type[JobResult]

    def check(self, given: Mapping[str, Any]) -> None:
        """Refuses an option this kind does not have, as Python refuses an unknown keyword argument, naming the
        nearest valid one: a misspelled option must not run silently with the default. Refuses a number its wire
        field cannot hold (a negative seed, a float where an integer goes) with InvalidArgument naming the option,
        where protobuf alone would raise a bare ValueError naming nothing."""
        for name in given:
            if name not in self.options:
                near = difflib.get_close_matches(name, self.options, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"valid: {', '.join(sorted(self.options))}"
                raise TypeError(f"{self.method}() got an unexpected keyword argument {name!r}; {hint}")
        for name, value in given.items():
            if isinstance(value, (int, float)) or _is_number(value):
                _check_number(name, value, self._wire_fields(name))

    def _wire_fields(self, option: str) -> list[tuple[type[Any], str]]:
        """The scalar proto fields an option is sent in: its own name in the kind's spec, the optimizer or the
        JobSpec (the SDK names options after their fields), or the budget's amount."""
        spec = optimization_pb2.JobSpec.DESCRIPTOR.fields_by_name[self.name].message_type._concrete_class
        # Number fields only: an int given for a text field (a class id sent as text) is its builder's to convert.
        found = [
            (message, option)
            for message in (spec, optimization_pb2.Optimizer, optimization_pb2.JobSpec)
            if option in message.DESCRIPTOR.fields_by_name
            and message.DESCRIPTOR.fields_by_name[option].type in _FIELD_KINDS
        ]
        return [*found, (optimization_pb2.Budget, "amount")] if option == "budget" else found


def _is_number(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def _check_number(option: str, value: Any, fields: list[tuple[type[Any], str]]) -> None:
    if isinstance(value, bool):
        return  # bool fields take bools; a bool in a number field is refused by the builder's own check
    if isinstance(value, float) and value != value:
        raise _invalid(option, "must be a number, got nan")
    for message, field in fields:
        try:
            setattr(message(), field, value)
        except (TypeError, ValueError):
            kind = message.DESCRIPTOR.fields_by_name[field].type
            wanted = _FIELD_KINDS.get(kind, "a number of its field's type")
            raise _invalid(option, f"must be {wanted}, got {value!r}") from None


# protobuf field types -> what the field holds, for the error message
_FIELD_KINDS = {
    FieldDescriptor.TYPE_INT32: "an integer from -2**31 to 2**31 - 1",
    FieldDescriptor.TYPE_INT64: "an integer from -2**63 to 2**63 - 1",
    FieldDescriptor.TYPE_UINT32: "an integer from 0 to 2**32 - 1",
    FieldDescriptor.TYPE_UINT64: "an integer from 0 to 2**64 - 1",
    FieldDescriptor.TYPE_DOUBLE: "a finite number",
    FieldDescriptor.TYPE_FLOAT: "a number that fits a 32-bit float",
}


def option_names(options: type) -> frozenset[str]:
    """The keys of an options TypedDict, its bases' included."""
    keys: frozenset[str] = options.__required_keys__ | options.__optional_keys__  # type: ignore[attr-defined]
    return keys


class JobOptions(TypedDict, total=False):
    """Settings every job kind takes (JobSpec's common fields)."""

    preview_every: int  # a PreviewEvent every this many steps (0: none)
    priority: int  # 0 to 9, higher runs first
    time_limit_s: float
    labels: Mapping[str, str]  # free labels, usable as a `jobs()` filter
    idempotency_key: str  # default: a fresh UUID, which makes a retried SubmitJob harmless


class OptimizerOptions(TypedDict, total=False):
    """The optimizer of a searching kind, by the server's registry name (`client.optimizers()` lists them)."""

    optimizer: str  # unset: the kind's (inversion lbfgs, others adam); nesterov, random_search, TwoPointsDE, CMA, ...
    learning_rate: float
    population_size: int  # candidates per step of gradient-free optimizers, evaluated as one batch
    optimizer_options: Mapping[str, Any]  # e.g. {"momentum": 0.9}


class BudgetOptions(TypedDict, total=False):
    """How long a searching kind runs."""

    budget: int  # iterations, or generator calls with budget_unit="generator_calls"
    budget_unit: BudgetUnit


def optimizer(options: OptimizerOptions) -> optimization_pb2.Optimizer | None:
    """The Optimizer message, or None when no optimizer option was given (the kind's default optimizer)."""
    if not any(key in options for key in OptimizerOptions.__optional_keys__):
        return None
    return optimization_pb2.Optimizer(
        name=options.get("optimizer", ""),
        learning_rate=options.get("learning_rate", 0.0),
        population_size=options.get("population_size", 0),
        options=_struct(options.get("optimizer_options", {})),
    )


def budget(options: BudgetOptions, *, default: int) -> optimization_pb2.Budget:
    unit = options.get("budget_unit", "iterations")
    if unit not in _BUDGET_UNITS:
        raise _invalid("budget_unit", f"expected one of {', '.join(_BUDGET_UNITS)}, got {unit!r}")
    return optimization_pb2.Budget(unit=_BUDGET_UNITS[unit], amount=options.get("budget", default))


def backend(value: str) -> optimization_pb2.Backend:
    if value not in _BACKENDS:
        raise _invalid("backend", f"expected local or remote, got {value!r}")
    return _BACKENDS[value]


def job_spec(kind: str, spec: Any, options: JobOptions) -> optimization_pb2.JobSpec:
    """The JobSpec holding one kind's spec message under its field, with the settings every kind shares."""
    return optimization_pb2.JobSpec(
        **{kind: spec},
        priority=options.get("priority", 0),
        time_limit_s=options.get("time_limit_s", 0.0),
        idempotency_key=options.get("idempotency_key") or uuid.uuid4().hex,
        labels=dict(options.get("labels", {})),
        preview_every=options.get("preview_every", 0),
    )


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct
