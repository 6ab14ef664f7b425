"""Triton's perf_analyzer against a running tserve, installed on demand.

    python -m bench.perf_analyzer --url 127.0.0.1:8001 [-- extra perf_analyzer flags]

The only perf_analyzer build on the package index targets glibc 2.38 (Debian 13); Debian 12
has 2.36. So this fetches the wheel for that platform, takes glibc, libstdc++, libgcc, zlib
and OpenSSL from Debian 13's packages (a private apt state; the system is not touched), and
runs the binary through Debian 13's own dynamic loader. Everything lands in .tools/.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "perf_analyzer"
VERSION = "2.60.0"
RUNTIME_DEBS = ["libc6", "libstdc++6", "libgcc-s1", "zlib1g", "libssl3t64"]
SOURCES = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n"


def _run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def ensure() -> list[str]:
    """Install (once) and return the command prefix that runs perf_analyzer."""
    binary = TOOLS / "perf_analyzer" / "bin" / "perf_analyzer"
    libs = TOOLS / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    if not binary.exists():
        wheels = TOOLS / "wheel"
        wheels.mkdir(parents=True, exist_ok=True)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_38_x86_64",
                "-d",
                str(wheels),
                f"perf-analyzer=={VERSION}",
            ]
        )
        with zipfile.ZipFile(next(wheels.glob("perf_analyzer-*.whl"))) as z:
            z.extractall(TOOLS)
        binary.chmod(0o755)
    if not (libs / "ld-linux-x86-64.so.2").exists():
        apt = TOOLS / "apt"
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / sub).mkdir(parents=True, exist_ok=True)
        (apt / "sources.list").write_text(SOURCES)
        opts = [
            f"-oDir::Etc::SourceList={apt / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={apt / 'lists'}",
            f"-oDir::Cache={apt / 'cache'}",
            "-oAPT::Sandbox::User=root",
        ]
        _run(["apt-get", *opts, "update"])
        _run(["apt-get", *opts, "download", *RUNTIME_DEBS], cwd=apt / "debs")
        for deb in (apt / "debs").glob("*.deb"):
            _run(["dpkg", "-x", str(deb), str(TOOLS / "root")])
        shutil.rmtree(apt)
    return [str(libs / "ld-linux-x86-64.so.2"), "--library-path", str(libs), str(binary)]


def token_input_file(path: Path, length: int, samples: int = 16, vocab: int = 256, seed: int = 0) -> Path:
    """perf_analyzer's random int64 data is far outside a byte vocabulary: give it valid ids."""
    rng = random.Random(seed)
    data = [
        {"input_ids": {"content": [rng.randrange(vocab) for _ in range(length)], "shape": [length]}}
        for _ in range(samples)
    ]
    path.write_text(json.dumps({"data": data}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="http: KServe v2 REST, e.g. on :8000")
    p.add_argument("--model", default="bytegpt")
    p.add_argument("--length", type=int, default=32, help="tokens per request")
    p.add_argument("extra", nargs="*", help="more perf_analyzer flags, after --")
    args = p.parse_args()
    data = token_input_file(TOOLS / f"input_{args.length}.json", args.length)
    cmd = [*ensure(), "-m", args.model, "-i", args.protocol, "-u", args.url, "--input-data", str(data), *args.extra]
    print(" ".join(cmd[3:]), flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
