"""One forward after a cached prefix: transformers' eager forward against the piecewise forward.

An agent turn computes a short suffix (a tool result, a user message) and a few tokens after a
long cached prefix. On the 8B shape such forwards are bound by launching ~1,000 kernels from
Python, not by the GPU; ``kvruntime/engines/piecewise.py`` replays them from CUDA graphs split at
attention. Rows: ``n`` new tokens after ``--cached`` cached ones, median wall time of the forward
(cache update and last-token logits included) for both paths, and the physical floor of that
forward on the H200: max(weights and KV read once at 4.8 TB/s, 2 * params * n FLOP at 989
TFLOP/s dense bf16). ``capture ms``: the one-time capture of that row's bucket (first call).

On the device machine (repository root, link tree as in docs/KERNEL_NOTES.md):
    PYTHONPATH=/tmp/lt:$PWD/benchmarks python3 benchmarks/bench_forward_overhead.py --out $OUT
Here, to write the section of docs/BENCHMARKS.md from what came back:
    python benchmarks/bench_forward_overhead.py --merge results.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from bench_agent_workload import random_llama
from record import markdown_table, run_or_merge

from kvruntime.engines.transformers import EngineConfig, TransformersEngine, TransformersState

SECTION = "forward overhead: piecewise CUDA graphs (H200)"
COMMAND = (
    "PYTHONPATH=/tmp/lt:$PWD/benchmarks python3 benchmarks/bench_forward_overhead.py --out $OUT"
    " (on the H200 device machine; recorded here with --merge results.json)"
)
HEADERS = ["new tokens", "eager ms", "piecewise ms", "speed-up", "floor ms", "piecewise/floor",
           "capture ms", "max abs dlogit"]  # fmt: skip
HBM_BYTES_PER_S = 4.8e12
BF16_FLOPS = 989e12


def measure(args: argparse.Namespace) -> dict[str, Any]:
    loaded, init_s = random_llama(args.shape, args.device)
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    L, H, D = loaded.layout
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    top = max(args.sizes)
    tokens = torch.randint(3, vocab, (args.cached + top,), generator=gen).tolist()
    chunk = args.cached + top
    fast = TransformersEngine(loaded, EngineConfig(prefill_chunk_tokens=chunk))
    eager = TransformersEngine(loaded, EngineConfig(prefill_chunk_tokens=chunk,
                                                    piecewise_forward=False))  # fmt: skip
    assert fast.piecewise is not None
    state = eager.prefill(tokens[: args.cached]).state
    assert isinstance(state, TransformersState)
    cache = state.cache
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(engine: TransformersEngine, n: int) -> tuple[float, torch.Tensor]:
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            logits = engine._forward(cache, tokens[args.cached : args.cached + n], args.cached)
        sync()
        took = time.perf_counter() - started
        for layer in cache.layers:  # back to the cached prefix
            layer.keys = layer.keys[:, :, : args.cached]
            layer.values = layer.values[:, :, : args.cached]
        return took * 1e3, logits

    rows = []
    for n in args.sizes:
        capture_ms, _ = run(fast, n)  # first call of this bucket: captures its graphs
        ms: dict[str, float] = {}
        out: dict[str, torch.Tensor] = {}
        for name, engine in (("eager", eager), ("piecewise", fast)):
            run(engine, n)  # warm-up
            times = []
            for _ in range(args.repeats):
                took, out[name] = run(engine, n)
                times.append(took)
            ms[name] = statistics.median(times)
        kv_bytes = 2 * L * H * D * 2 * (args.cached + n)
        floor = max((2 * params + kv_bytes) / HBM_BYTES_PER_S, 2 * params * n / BF16_FLOPS) * 1e3
        diff = (out["eager"] - out["piecewise"]).abs().max().item()
        rows.append([n, round(ms["eager"], 1), round(ms["piecewise"], 1),
                     round(ms["eager"] / ms["piecewise"], 2), round(floor, 1),
                     round(ms["piecewise"] / floor, 2), round(capture_ms, 0),
                     float(f"{diff:.3g}")])  # fmt: skip
    return {
        "shape": args.shape, "cached": args.cached, "repeats": args.repeats,
        "init_s": round(init_s, 1), "params": params,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "rows": rows,
    }  # fmt: skip


def body(result: dict[str, Any]) -> str:
    return (
        f"{result['device']}, torch {result['torch']}, transformers {result['transformers']};"
        f" random {result['shape']} bf16 ({result['params'] / 1e9:.2f}B parameters), one forward"
        f" of the new tokens after {result['cached']:,} cached tokens, median of"
        f" {result['repeats']} after a warm-up. `eager`: transformers' forward (with"
        " `engines/attention.py`); `piecewise`: `engines/piecewise.py`, CUDA graphs of the row"
        " bucket holding the new tokens (up to 2,048; padding rows computed and ignored)."
        " `floor`: weights and KV read once at 4.8 TB/s or the FLOPs at 989 TFLOP/s, whichever"
        " is longer. max abs dlogit: last-token logits of the two paths.\n\n"
        + markdown_table(HEADERS, result["rows"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cached", type=int, default=12288)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16, 100, 256, 500, 1024, 2048, 4096])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    run_or_merge(parser, measure, body, SECTION, COMMAND, HEADERS)


if __name__ == "__main__":
    main()
