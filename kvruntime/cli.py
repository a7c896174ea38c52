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
