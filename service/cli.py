"""`tserve serve` (and later subcommands): flags are generated from the Settings fields."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from service import __version__


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, help=f"{help_text} (default: {field.default})")


def serve(args: argparse.Namespace) -> int:
    from service.logs import configure
    from service.server import TServe
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as e:
        print(f"tserve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    asyncio.run(TServe(settings).run())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tserve", description="Serve ONNX Transformers over the Open Inference Protocol.")
    p.add_argument("--version", action="version", version=f"tserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository over gRPC")
    _add_settings_flags(s)
    s.set_defaults(func=serve)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
