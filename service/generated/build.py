"""Generate Python stubs from protos/ into service/generated/ (`make protos`, i.e. `python -m service.generated.build`).

Written by hand rather than a plain protoc call because two edits follow generation:
imports become package-relative, and descriptors go to service.generated.POOL (see there).
`--check` regenerates into a temporary folder and fails if the committed stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = ROOT / "service" / "generated"


def generate(out: Path) -> list[Path]:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("*.proto"))
    rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", *sources])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    written = sorted(p for p in out.iterdir() if re.search(r"_pb2(_grpc)?\.pyi?$", p.name))
    for path in written:
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        text = text.replace("_descriptor_pool.Default()", "_POOL")
        text = text.replace(
            "from google.protobuf.internal import builder as _builder",
            "from google.protobuf.internal import builder as _builder\nfrom . import POOL as _POOL",
        )
        path.write_text(text)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = p.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh if not (OUT / f.name).exists() or not filecmp.cmp(f, OUT / f.name, shallow=False)]
        committed = {p.name for p in OUT.iterdir() if re.search(r"_pb2(_grpc)?\.pyi?$", p.name)}
        extra = sorted(committed - {f.name for f in fresh})
    if stale or extra:
        sys.exit(f"generated stubs are stale: {stale + extra}; run `make protos` and commit the result")
    print("generated stubs are current")


if __name__ == "__main__":
    main()
