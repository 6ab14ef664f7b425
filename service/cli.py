"""`tserve serve` (and later subcommands): flags are generated from the Settings fields."""

from __future__ import annotations

import argparse
import asyncio
import sys

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
    from service.workers import Supervisor, worker_count

    workers = worker_count(settings)
    try:
        if workers > 1:
            return Supervisor(settings, workers).run()
        asyncio.run(TServe(settings).run())
    except OSError as e:  # a port taken, a certificate unreadable: say which and stop
        print(f"tserve: {e}", file=sys.stderr)
        return 1
    return 0


def generate(args: argparse.Namespace) -> int:
    """Stream a completion from a running server into the terminal."""
    import grpc

    from service.generated import generation_pb2 as gen
    from service.generated import generation_pb2_grpc as gen_grpc

    sampling = gen.SamplingParameters(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    request = gen.GenerateRequest(model=args.model, sampling=sampling, stop=args.stop or [])
    if args.token_ids is not None:
        try:
            request.token_ids.ids.extend(int(t) for t in args.token_ids.split(",") if t.strip())
        except ValueError:
            print(
                f"tserve generate: --token-ids takes integers separated by commas, not {args.token_ids!r}",
                file=sys.stderr,
            )
            return 2
    elif args.prompt is not None:
        request.text = args.prompt
    else:
        print("tserve generate: give a prompt, or --token-ids", file=sys.stderr)
        return 2
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    with grpc.insecure_channel(args.url) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        try:
            if not args.quiet and args.token_ids is None:
                sys.stdout.write(args.prompt)
            last = None
            for last in stub.GenerateStream(request, timeout=args.timeout):
                # token-id prompts print the ids generated (the model may have no tokenizer)
                out = last.text if args.token_ids is None else "".join(f"{t}," for t in last.token_ids)
                sys.stdout.write(out)
                sys.stdout.flush()
        except grpc.RpcError as e:
            print(f"\ntserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if last is not None and not args.quiet:
        reason = gen.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(
            f"\n[{reason}: {last.usage.prompt_tokens} prompt + {last.usage.generated_tokens} generated tokens, "
            f"first token {last.timings.time_to_first_token_seconds * 1e3:.1f} ms, "
            f"total {last.timings.total_seconds * 1e3:.1f} ms]",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tserve", description="Serve ONNX Transformers over the Open Inference Protocol.")
    p.add_argument("--version", action="version", version=f"tserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository over gRPC")
    _add_settings_flags(s)
    s.set_defaults(func=serve)
    g = sub.add_parser("generate", help="stream a completion from a running server")
    g.add_argument("prompt", nargs="?", help="the prompt as text")
    g.add_argument(
        "--token-ids",
        help="the prompt as token ids, e.g. 1,2,3 (for models without a tokenizer); prints the generated ids",
    )
    g.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    g.add_argument("--model", default="bytegpt")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds before the request's deadline")
    g.add_argument("--quiet", action="store_true", help="print only the generated text")
    g.set_defaults(func=generate)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
