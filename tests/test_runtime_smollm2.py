"""The runtime on the real SmolLM2-135M-Instruct: with codec ``none``, reused turns produce the
same greedy tokens as recomputing, across turns, a fork and a spill to the host tier."""

from __future__ import annotations

from typing import Any

from model_fixtures import smollm2, smollm2_engine  # noqa: F401

from kvruntime.config import MiB, RuntimeConfig
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.runtime import Runtime

SYSTEM = (
    "You are a helpful assistant for a hardware store. You know the stock: hammers, nails, "
    "screws, drills, saws, paint, brushes, ladders, tape, glue. Answer briefly and politely. "
) * 6


def converse(rt: Runtime, questions: list[str], fork_at: int | None = None) -> list[Any]:
    s = rt.session()
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    out = []
    for i, q in enumerate(questions):
        if i == fork_at:
            s = s.fork()
        msgs.append({"role": "user", "content": q})
        r = s.chat(msgs, max_tokens=12)
        out.append(r)
        msgs.append({"role": "assistant", "content": r.text})
    rt.cache.flush(30)
    return out


def test_smollm2_reuse_matches_recompute_with_host_spill(
    smollm2_engine: TransformersEngine,  # noqa: F811
    smollm2: LoadedModel,  # noqa: F811
) -> None:
    questions = ["Do you sell drills?", "Which paint for a bathroom?", "And a brush for it?"]
    fixed = dict(prefill_tokens_per_s=500.0, host_bytes_per_s=2e9)
    base = Runtime(smollm2_engine, smollm2.tokenizer, RuntimeConfig(reuse=False, **fixed))
    want = [r.token_ids for r in converse(base, questions, fork_at=2)]
    base.close()
    # 4 MiB of device pages holds 80 of the ~300 prompt tokens: the rest spills to the host
    config = RuntimeConfig(device_kv_bytes=4 * MiB, host_kv_bytes=64 * MiB, **fixed)
    rt = Runtime(smollm2_engine, smollm2.tokenizer, config)
    got = converse(rt, questions, fork_at=2)
    rt.close()
    assert [r.token_ids for r in got] == want
    assert all(len(t) > 0 for t in want)
    for r in got[1:]:
        assert r.usage.cached_tokens >= 0.7 * r.usage.prompt_tokens, r.usage
    assert sum(r.usage.cached_tokens_by_tier["host"] for r in got) > 0
