"""The committed generated code matches the .proto files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lines that name the generator's own version, which may move ahead of the
# committed code without the contract changing.
VERSION_LINE = re.compile(
    r"Protobuf Python Version|GRPC_GENERATED_VERSION|^\s+\d+,\s*$|"
    r"_runtime_version\.ValidateProtobufRuntimeVersion"
)


def generate(out):
    spec = importlib.util.spec_from_file_location(
        "generate", ROOT / "protos/generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(out)


def comparable(path):
    return [
        line for line in path.read_text().splitlines() if not VERSION_LINE.search(line)
    ]


def test_generated_code_matches_the_protos(tmp_path):
    fresh = generate(tmp_path)
    names = {path.relative_to(tmp_path) for path in fresh}
    committed = {
        path.relative_to(ROOT)
        for path in (ROOT / "calcsvc/_generated").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert names == committed
    stale = [
        name
        for name in sorted(names)
        if comparable(tmp_path / name) != comparable(ROOT / name)
    ]
    assert stale == [], "run `make protos` and commit the result"
