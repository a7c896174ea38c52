"""Parallel sub-agents forked from one planning session, in process (no server).

The planner reads a long brief once; three sub-agents fork from it and run at the same time,
each on its own part. Every fork reuses the planner's cached prefix instead of recomputing it.

Run: ``.venv/bin/python examples/subagents_inprocess.py [--model smollm2]``
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

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
    print(f"planner: {plan.usage.prompt_tokens} prompt tokens, {plan.usage.cached_tokens} reused")

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
    print(f"{'sub-agent':<22} {'prompt':>6} {'cached':>6} {'device':>6} {'host':>5} {'redis':>5}")
    for part in PARTS:
        u = results[part].usage
        tiers = u.cached_tokens_by_tier
        print(
            f"{part:<22} {u.prompt_tokens:>6} {u.cached_tokens:>6} {tiers['device']:>6}"
            f" {tiers['host']:>5} {tiers['redis']:>5}"
        )
    rt.close()


if __name__ == "__main__":
    main()
