"""The one error type of the model registry, so that a service can turn any bad card or weight file into a clear
status naming the file and the field or weights key at fault."""

from __future__ import annotations

from pathlib import Path


class ModelRegistryError(Exception):
    """A bad card, a missing or mismatched weight file, or an unknown model reference."""

    def __init__(self, message: str, *, path: Path | str | None = None, field: str | None = None) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.field is not None:
            where.append(f"[{self.field}]")
        return f"{' '.join(where)}: {self.message}" if where else self.message

    def at(self, path: Path | str) -> ModelRegistryError:
        """The same error attributed to `path`; used where the file is known only above the check that failed."""
        return type(self)(self.message, path=path, field=self.field)


class ModelNotFound(ModelRegistryError):
    """A reference (`name` or `name@version`) that no registry root holds."""


class ModelUnavailable(Exception):
    """A model that exists but cannot serve this use: listed for ONNX without an export, or stored as ONNX only
    when gradients are needed. `reason` is a stable code (`NO_ONNX_EXPORT`, `FORWARD_ONLY`)."""

    def __init__(self, message: str, reason: str) -> None:
        self.message, self.reason = message, reason
        super().__init__(message)
