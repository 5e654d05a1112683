"""The model registry: folders named `name@version`, each a `model.json` card beside its weight files.

Several roots are searched in order, like a PATH: the first is writable (tuning jobs write new versions there),
the later ones (the built-in zoo shipped in the package) are read-only. A new version becomes visible in one
`os.rename` of a complete folder, so readers never see a half-written model and two writers never share a
version number.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gansteer_server.models.card import CARD_FILE, NAME_PATTERN, ModelCard, check_file_name
from gansteer_server.models.errors import ModelNotFound, ModelRegistryError
from gansteer_server.models.loaders import LoadedModel, load_latent_prior, load_model, verify_model_files

_FOLDER = re.compile(rf"(?P<name>{NAME_PATTERN})@(?P<version>[1-9][0-9]*)")
_TEMP_PREFIX = ".tmp-"  # never matches _FOLDER, so a writer's unfinished (or crashed) folder is never listed


@dataclass(frozen=True)
class ModelEntry:
    """A resolved model: its card, the folder its files lie in, and whether that folder's root is read-only."""

    card: ModelCard
    folder: Path
    read_only: bool

    @property
    def ref(self) -> str:
        return self.card.ref


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` -> (name, None) meaning the newest version; `name@version` -> (name, version)."""
    name, at, version = ref.partition("@")
    if at and not re.fullmatch(r"[1-9][0-9]*", version):
        raise ModelRegistryError(f"{ref!r}: the version after '@' must be a positive integer", field="ref")
    if not re.fullmatch(NAME_PATTERN, name):
        raise ModelRegistryError(f"{ref!r} is not a model reference ('name' or 'name@version')", field="ref")
    return name, int(version) if at else None


class ModelRegistry:
    """Look up, load and register models across `paths`; `paths[0]` is the one writable root."""

    def __init__(self, paths: Sequence[Path | str]) -> None:
        if not paths:
            raise ValueError("a registry needs at least one root (the writable one)")
        self.paths = [Path(p) for p in paths]

    @property
    def writable_root(self) -> Path:
        return self.paths[0]

    def list(self) -> builtins.list[ModelCard]:
        """Every version of every model, sorted by name then version (an earlier root shadows a later one)."""
        return [self._read_card(folder, *key) for key, (folder, _) in sorted(self._folders().items())]

    def versions(self, name: str) -> builtins.list[int]:
        return sorted(version for _, version in self._folders(name))

    def resolve(self, ref: str) -> ModelEntry:
        """The entry for `name` (its newest version across all roots) or for `name@version`."""
        name, version = parse_ref(ref)
        folders = self._folders(name)
        if not folders:  # the registry's folders are the server's business: a client is told the name only
            raise ModelNotFound(f"no model named {name!r} in the registry (ListModels lists them)", field="ref")
        if version is None:
            version = max(v for _, v in folders)
        elif (name, version) not in folders:
            known = ", ".join(str(v) for _, v in sorted(folders))
            raise ModelNotFound(f"{name!r} has no version {version} (versions: {known})", field="ref")
        folder, read_only = folders[(name, version)]
        return ModelEntry(self._read_card(folder, name, version), folder, read_only)

    def card(self, ref: str) -> ModelCard:
        return self.resolve(ref).card

    def load(self, ref: str, device: str | torch.device = "cpu", prefer_onnx: bool = False) -> LoadedModel:
        """The model in eval mode on `device`; with `prefer_onnx`, its ONNX export where it has one (forward only)."""
        entry = self.resolve(ref)
        return load_model(entry.card, entry.folder, device=device, prefer_onnx=prefer_onnx)

    def latent_prior(self, ref: str) -> tuple[Tensor, Tensor] | None:
        """(mean, covariance) of the generator's Gaussian prior, or None when z is standard normal."""
        entry = self.resolve(ref)
        return load_latent_prior(entry.card, entry.folder)

    def register(
        self,
        name: str,
        card: ModelCard | Mapping[str, Any],
        files: Mapping[str, Path | bytes],
        version: int | None = None,
    ) -> ModelEntry:
        """Add a version of `name` to the writable root and return it.

        `card` may omit `name`, `version` and `created` (the registry fills them; a ModelCard's own version is
        replaced). `files` maps each file name in the new folder to a path to copy or the bytes to write. The card
        is validated and the weights loaded once before the version becomes visible. `version=None` takes the next
        free number, retrying when a concurrent writer claims it first; an explicit version that exists is an error.
        """
        draft = self._draft(name, card, version)
        if version is not None and version in self.versions(name):
            raise ModelRegistryError(f"{draft.ref} exists already", field="version")
        missing = [f for f in draft.files if f not in files]
        if missing:
            raise ModelRegistryError(f"the card names {missing} but no such file was given", field="files")
        self.writable_root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{name}-", dir=self.writable_root))
        try:
            sources = _write_files(temp, files)
            try:
                verify_model_files(draft, temp)
            except ModelRegistryError as error:
                # Name the file the caller gave, not its copy in the temporary folder.
                if error.path is not None and error.path.parent == temp:
                    raise error.at(sources.get(error.path.name, error.path)) from None
                raise
            return self._claim(draft, temp, version)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _draft(self, name: str, card: ModelCard | Mapping[str, Any], version: int | None) -> ModelCard:
        fields = card.to_dict() if isinstance(card, ModelCard) else dict(card)
        if fields.get("name", name) != name:
            raise ModelRegistryError(f"the card is named {fields['name']!r} but registered as {name!r}", field="name")
        fields["name"] = name
        fields["version"] = 1 if version is None else version  # a placeholder until _claim picks the number
        fields.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
        return ModelCard.from_dict(fields, path=f"<card of {name}>")

    def _claim(self, draft: ModelCard, temp: Path, version: int | None) -> ModelEntry:
        """Rename the finished folder to the next free `name@version`. rename(2) of a directory fails when the
        target exists and is not empty, and every model folder holds its card, so of two writers racing for one
        number exactly one wins; the other rescans and tries the next."""
        while True:
            number = version if version is not None else max(self.versions(draft.name), default=0) + 1
            card = dataclasses.replace(draft, version=number)
            _write_durably(temp / CARD_FILE, card.to_json().encode())
            target = self.writable_root / card.ref
            try:
                os.rename(temp, target)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if version is not None:
                    raise ModelRegistryError(f"{card.ref} exists already", path=target, field="version") from None
                continue
            _fsync_directory(self.writable_root)
            return ModelEntry(card, target, read_only=False)

    def _folders(self, name: str | None = None) -> dict[tuple[str, int], tuple[Path, bool]]:
        """(name, version) -> (folder, read_only) over all roots; the first root holding a version wins."""
        found: dict[tuple[str, int], tuple[Path, bool]] = {}
        for index, root in enumerate(self.paths):
            if not root.is_dir():
                continue  # a root not created yet (the writable one before its first registration) holds nothing
            with os.scandir(root) as entries:
                for entry in entries:
                    match = _FOLDER.fullmatch(entry.name)
                    if match is None or not entry.is_dir() or (name is not None and match["name"] != name):
                        continue
                    found.setdefault((match["name"], int(match["version"])), (Path(entry.path), index > 0))
        return found

    @staticmethod
    def _read_card(folder: Path, name: str, version: int) -> ModelCard:
        path = folder / CARD_FILE
        card = ModelCard.from_file(path)
        if card.name != name:
            raise ModelRegistryError(
                f"the card is named {card.name!r} but its folder is {folder.name!r}", path=path, field="name"
            )
        if card.version != version:
            raise ModelRegistryError(
                f"the card says version {card.version} but its folder is {folder.name!r}", path=path, field="version"
            )
        return card


def _write_files(folder: Path, files: Mapping[str, Path | bytes]) -> dict[str, Path]:
    """Write the files of a new version; returns, per file name, how to name its source in an error."""
    sources: dict[str, Path] = {}
    for file_name, source in files.items():
        check_file_name(file_name, "files")
        target = folder / file_name
        if isinstance(source, (bytes, bytearray, memoryview)):
            _write_durably(target, bytes(source))
            sources[file_name] = Path(f"<bytes given as {file_name}>")
            continue
        source = Path(source)
        if not source.is_file():
            raise ModelRegistryError("the file to register does not exist", path=source, field=file_name)
        shutil.copyfile(source, target)
        _fsync_file(target)
        sources[file_name] = source
    return sources


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a rename survive a crash; directories cannot be opened for fsync on every platform."""
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
