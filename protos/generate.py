"""Generate calcsvc's Python code from the .proto files in this folder.

Run it from anywhere with the project's virtual environment:

    python protos/generate.py            # rewrites calcsvc/_generated
    python protos/generate.py --out DIR  # writes the tree below DIR instead

The generated modules live in ``calcsvc/_generated`` and are committed;
``tests/test_generated.py`` fails when they no longer match the .proto files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
PACKAGE = "calcsvc/_generated"


def generate(out: Path) -> list[Path]:
    """Write the generated modules below ``out`` and return their paths."""
    sources = sorted(PROTOS.rglob("*.proto"))
    plugin = Path(sys.executable).with_name("protoc-gen-mypy_grpc")
    if not plugin.exists():
        found = shutil.which("protoc-gen-mypy_grpc")
        if found is None:
            msg = "protoc-gen-mypy_grpc not found: install the dev extras"
            raise SystemExit(msg)
        plugin = Path(found)

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        # Map the import root onto the package, so the generated modules
        # import each other as calcsvc._generated.* and need no rewriting.
        f"-I{PACKAGE}={PROTOS}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")

    package = out / PACKAGE
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return sorted(p for p in package.rglob("*") if p.is_file())


def main() -> None:
    """Generate into ``--out`` and list the files written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
