"""Prefill of N new tokens after an N-token cached prefix: stock sdpa against kvr_sdpa.

Stock transformers builds an explicit mask when queries follow cached keys, which keeps PyTorch
off the flash kernel; ``kvruntime/engines/attention.py`` passes a bottom-right causal bias
instead. Both engines share one random Llama-8B-shaped bf16 model (``random_llama``) and are fed
the same prefix pages. Rows: the suffix after the cached prefix (the case fixed), the same
suffix from scratch and all 2N tokens recomputed, for scale. ``max abs dlogit`` compares the last
position's logits of the two paths.

On the device machine (repository root, link tree as in docs/KERNEL_NOTES.md):
    PYTHONPATH=/tmp/lt python3 benchmarks/bench_prefill_after_prefix.py --out $OUT
Here, to write the section of docs/BENCHMARKS.md from what came back:
    python benchmarks/bench_prefill_after_prefix.py --merge results.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from bench_agent_workload import random_llama
from record import markdown_table, run_or_merge

from kvruntime.engines.base import KVPrefix
from kvruntime.engines.transformers import EngineConfig, TransformersEngine

SECTION = "prefill after a cached prefix (H200)"
COMMAND = (
    "PYTHONPATH=/tmp/lt python3 benchmarks/bench_prefill_after_prefix.py --out $OUT"
    " (on the H200 device machine; recorded here with --merge results.json)"
)
HEADERS = ["prompt", "stock sdpa ms", "kvr_sdpa ms", "speed-up", "max abs dlogit"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    loaded, init_s = random_llama(args.shape, args.device)
    n = args.tokens
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, loaded.model.config.vocab_size, (2 * n,), generator=gen).tolist()
    one_chunk = 2 * n  # one forward per prompt: the chunking of long prompts is another matter

    def engine(fast: bool) -> TransformersEngine:
        # the flag switches the shared model's attention when an engine is made: make one per use
        config = EngineConfig(prefill_chunk_tokens=one_chunk, fast_causal_attention=fast)
        return TransformersEngine(loaded, config)

    page = 16
    stock = engine(False)
    pages = stock.export_pages(stock.prefill(tokens[:n]).state, 0, n // page, page)
    past = KVPrefix(pages=pages, num_tokens=n)  # [n/16, L, 2, H, 16, D] bf16 on the device
    cases = {
        f"{n} after {n} cached": (tokens, past),
        f"{n} from scratch": (tokens[n:], None),
        f"{2 * n} recomputed": (tokens, None),
    }
    rows = []
    ops: dict[str, dict[bool, list[str]]] = {}
    for label, (prompt, prefix) in cases.items():
        ms: dict[bool, float] = {}
        logits: dict[bool, torch.Tensor] = {}
        for fast in (False, True):
            current = engine(fast)
            current.prefill(prompt, past=prefix)  # warm-up: kernels, allocator
            times = []
            for _ in range(args.repeats):
                result = current.prefill(prompt, past=prefix)
                times.append(result.prefill_s * 1e3)
                logits[fast] = result.logits
                del result
            ms[fast] = statistics.median(times)
        ops[label] = {fast: attention_ops(engine(fast), prompt, prefix) for fast in (False, True)}
        diff = (logits[True] - logits[False]).abs().max().item()
        rows.append([label, round(ms[False], 1), round(ms[True], 1),
                     round(ms[False] / ms[True], 2), float(f"{diff:.3g}")])  # fmt: skip
    return {
        "shape": args.shape,
        "tokens": n,
        "repeats": args.repeats,
        "init_s": round(init_s, 1),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "rows": rows,
        "attention_ops": {k: {"stock": v[False], "kvr": v[True]} for k, v in ops.items()},
    }


def attention_ops(
    engine: TransformersEngine, prompt: list[int], past: KVPrefix | None
) -> list[str]:
    """The aten attention ops one prefill ran (flash, efficient, math...): which kernel SDPA
    chose is what this benchmark is about, so it is recorded beside the times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.prefill(prompt, past=past)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "attention" in n.lower() and n.startswith("aten::_"))


def body(result: dict[str, Any]) -> str:
    table = markdown_table(HEADERS, result["rows"])
    return (
        f"{result['device']}, torch {result['torch']}, transformers {result['transformers']};"
        f" random {result['shape']} bf16, one forward per prompt, median of"
        f" {result['repeats']} after a warm-up; `prefill_s` of the engine (restore excluded).\n"
        "`kvr_sdpa` is `kvruntime/engines/attention.py` (bottom-right causal SDPA); max abs dlogit"
        " compares the last position's logits of the two paths.\n\n"
        + table
        + "".join(
            f"\n- attention ops, {case}: stock {', '.join(o['stock']) or '-'};"
            f" kvr_sdpa {', '.join(o['kvr']) or '-'}"
            for case, o in result.get("attention_ops", {}).items()
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="prefix and suffix length")
    parser.add_argument("--repeats", type=int, default=3)
    run_or_merge(parser, measure, body, SECTION, COMMAND, HEADERS)


if __name__ == "__main__":
    main()
