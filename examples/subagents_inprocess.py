"""Parallel sub-agents forked from one planning session, in process (no server).

The planner reads a long brief once; three sub-agents fork from it and run at the same time,
each on its own part. Every fork reuses the planner's cached prefix instead of recomputing it.

Run: ``.venv/bin/python examples/subagents_inprocess.py [--model smollm2]``
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from _reuse_table import from_result_usage, print_reuse

import kvruntime

BRIEF = (
    "Project brief: the billing service must move from nightly batch invoices to real-time "
    "invoicing. Constraints: no downtime, invoices must stay identical to the batch output, "
    "and the ledger remains the source of truth. Components: ingest API, rating engine, "
    "invoice renderer, ledger writer, notification sender. "
) * 4
PARTS = ["the rating engine", "the invoice renderer", "the ledger writer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    rt = kvruntime.Runtime.from_pretrained(args.model)
    planner = rt.session()
    plan_msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a lead engineer who plans and delegates."},
        {"role": "user", "content": BRIEF + "Write a one-line plan."},
    ]
    plan = planner.chat(plan_msgs, max_tokens=args.max_tokens)
    plan_msgs.append({"role": "assistant", "content": plan.text})
    print(f"planner: {plan.text.strip()[:60]!r}")

    results: dict[str, kvruntime.ChatResult] = {}

    def sub_agent(part: str) -> None:
        child = planner.fork()
        msgs = [*plan_msgs, {"role": "user", "content": f"You own {part}. List its first step."}]
        results[part] = child.chat(msgs, max_tokens=args.max_tokens)

    threads = [threading.Thread(target=sub_agent, args=(p,)) for p in PARTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns = [from_result_usage(plan.usage)]
    for part in PARTS:
        print(f"sub-agent on {part}: {results[part].text.strip()[:60]!r}")
        turns.append(from_result_usage(results[part].usage))
    print_reuse("subagents in-process: the planner, then each sub-agent", turns)
    rt.close()


if __name__ == "__main__":
    main()
