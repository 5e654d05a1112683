"""Generate the Python gRPC stubs of gansteer's protos into the SDK, or check that the committed ones are current.

    python protos/generate.py           # writes clients/python/gansteer/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python protos/generate.py --check   # regenerates into a temporary folder; exits 1 naming stale files

The stubs are committed so that installing the SDK needs no code generator. They depend on the exact
grpcio-tools version (its protoc and its runtime-version guards), which is why the SDK's `dev` extra pins it.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SDK_ROOT = PROTO_ROOT.parent / "clients" / "python"
PACKAGE = Path("gansteer") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The package's .proto files, relative to `PROTO_ROOT`, sorted so the output does not depend on the disk."""
    return sorted(path.relative_to(PROTO_ROOT) for path in (PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under `out_root` (as `gansteer/v1/...`); return the generated files relative to it."""
    protos = proto_files()
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (its message is above)")
    return sorted(path.relative_to(out_root) for path in (out_root / PACKAGE).iterdir() if _is_generated(path))


def _is_generated(path: Path) -> bool:
    return path.is_file() and path.name.endswith(GENERATED_SUFFIXES)


def stale_files(sdk_root: Path = SDK_ROOT) -> list[str]:
    """Generated files that are missing, different or left over in `sdk_root`, relative to it; empty when current."""
    with tempfile.TemporaryDirectory(prefix="gansteer-protos-") as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {p.relative_to(sdk_root) for p in (sdk_root / PACKAGE).glob("*") if _is_generated(p)}
        stale = [
            f"{path} (missing)" if not (sdk_root / path).exists() else f"{path} (differs)"
            for path in sorted(fresh)
            if not (sdk_root / path).exists() or not filecmp.cmp(Path(tmp) / path, sdk_root / path, shallow=False)
        ]
        stale += [f"{path} (no .proto generates it)" for path in sorted(committed - fresh)]
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are not current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"stale gRPC stubs under {SDK_ROOT / PACKAGE} (grpcio-tools {_grpc_tools_version()}):\n  "
                + "\n  ".join(stale)
                + "\nrun `python protos/generate.py` and commit the result"
                + " (or install the grpcio-tools version the SDK's dev extra pins)",
                file=sys.stderr,
            )
            return 1
        print(f"gRPC stubs are current ({len(proto_files())} protos)")
        return 0
    for path in (SDK_ROOT / PACKAGE).glob("*"):
        if _is_generated(path):
            path.unlink()
    written = generate(SDK_ROOT)
    print(f"wrote {len(written)} files under {SDK_ROOT / PACKAGE}")
    return 0


def _grpc_tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


if __name__ == "__main__":
    sys.exit(main())
