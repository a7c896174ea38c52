"""``kvruntime`` command line: ``demo``, ``serve``, ``report``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from kvruntime.demo import run_demo

    return run_demo(
        model=args.model,
        redis_url=args.redis_url,
        max_tokens=args.max_tokens,
        jsonl=args.jsonl,
        turns=args.turns,
    )


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """``1073741824``, ``512MiB``, ``2G``, ``64k`` -> bytes (binary units)."""
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512MiB)") from None
    return int(value)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvruntime.analytics import Analytics
    from kvruntime.config import RuntimeConfig
    from kvruntime.runtime import Runtime
    from kvruntime.server import ServerConfig, create_app

    fields = {
        k: getattr(args, k)
        for k in (
            "device",
            "page_size",
            "device_kv_bytes",
            "host_kv_bytes",
            "max_queue",
            "max_redis_index_pages",
        )
        if getattr(args, k) is not None
    }
    fields["redis_url"] = None if args.redis_url in (None, "none") else args.redis_url
    for k in ("host_codec", "redis_codec"):
        if getattr(args, k) is not None:
            fields[k] = getattr(args, k)
    rt = Runtime.from_pretrained(args.model, RuntimeConfig(**fields))
    if args.jsonl:
        rt.analytics = Analytics(jsonl_path=args.jsonl)
    name = args.served_model_name or args.model
    config = ServerConfig(
        model_name=name,
        aliases=(args.model,),
        default_max_tokens=args.default_max_tokens or None,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    try:
        uvicorn.run(
            create_app(rt, config),
            host=args.host,
            port=args.port,
            log_level="info" if args.verbose else "warning",
            timeout_graceful_shutdown=5,
        )
    finally:
        rt.close()
    return 0


def _report(args: argparse.Namespace) -> int:
    from kvruntime.report import main_report

    return main_report(jsonl=args.jsonl, url=args.url, tenant=args.tenant, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvruntime", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="multi-turn tool-use agents on SmolLM2 (CPU), reuse against recompute"
    )
    demo.add_argument("--model", default="smollm2", help="model alias or local path")
    demo.add_argument(
        "--redis-url", default="local", help="Redis URL; 'local' starts a private redis-server,"
        " 'none' disables the Redis tier",
    )  # fmt: skip
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--turns", type=int, default=4, choices=range(1, 5), metavar="1-4")
    demo.add_argument("--jsonl", default=None, help="also write per-turn analytics here")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see docs/server.md)")
    serve.add_argument("--model", required=True, help="model alias (smollm2) or local path")
    serve.add_argument("--served-model-name", default=None, help="the id clients send as model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--redis-url", default=None, help="Redis tier URL; none disables it")
    serve.add_argument("--device", default=None, help="cpu or cuda")
    serve.add_argument("--device-kv-bytes", type=byte_size, default=None, help="e.g. 2GiB")
    serve.add_argument("--host-kv-bytes", type=byte_size, default=None, help="0 disables")
    serve.add_argument("--page-size", type=int, default=None, help="tokens per KV page")
    serve.add_argument("--host-codec", default=None, help="none, fp8, int8, int4")
    serve.add_argument("--redis-codec", default=None, help="none, fp8, int8, int4")
    serve.add_argument(
        "--max-queue", type=int, default=None, help="turns queued before 503 Overloaded"
    )
    serve.add_argument(
        "--default-max-tokens", type=int, default=1024,
        help="completion limit when a request sets none (0: up to the context)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-bytes",
        type=byte_size,
        default=None,
        help="larger request bodies get 413 (default: 1 MiB + 64 B per context token)",
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longer prompts get 400 (default: the model's context)",
    )
    serve.add_argument(
        "--max-redis-index-pages", type=int, default=None,
        help="most index entries for pages held only in Redis (older ones are forgotten)",
    )  # fmt: skip
    serve.add_argument("--jsonl", default=None, help="append per-turn analytics here")
    serve.set_defaults(func=_serve)

    report = sub.add_parser("report", help="HTML cache-hit report from analytics")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl", help="a JSONL file of turn records (serve/demo --jsonl)")
    source.add_argument("--url", help="a running server's base URL")
    report.add_argument("--tenant", default="default", help="with --url: whose turns")
    report.add_argument("--out", default="report.html")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
