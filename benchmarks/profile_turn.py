"""Where one agent turn's engine time goes, on the Llama-8B shape (diagnostic, prints only).

Runs one session of growing prompts (a 12K prompt, then +1,280 tokens a turn) twice: on a
Runtime with a small device pool and a host tier, and on one with a large pool only. Prints per
turn the wall time of ``Runtime.generate`` and its parts (``Timings``: restore, prefill, first
token, decode of the other tokens, commit), and a cProfile of the last turn. Then the engine
alone: decode steps on a DynamicCache (wall and GPU time) and a torch profile of one step.

On the device machine (link tree as in docs/KERNEL_NOTES.md):
    PYTHONPATH=/tmp/lt:$PWD/benchmarks python3 benchmarks/profile_turn.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from bench_agent_workload import random_llama

from kvruntime.config import RuntimeConfig
from kvruntime.engines.transformers import EngineConfig, TransformersEngine, TransformersState
from kvruntime.runtime import Runtime

MiB = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--first", type=int, default=12288)
    p.add_argument("--step", type=int, default=1280)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--device-mib", type=int, default=512)
    args = p.parse_args()
    loaded, _ = random_llama(args.shape, args.device)
    engine = TransformersEngine(loaded, EngineConfig(prefill_chunk_tokens=16384))
    vocab = loaded.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    total = args.first + args.step * args.turns
    ids = torch.randint(3, vocab, (total,), generator=gen).tolist()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    engine.prefill(ids[:64])
    prof = cProfile.Profile()
    for name, device_mib, host_mib in (("host", args.device_mib, 8192), ("device", 8192, 0)):
        config = RuntimeConfig(
            device=args.device, device_kv_bytes=device_mib * MiB, host_kv_bytes=host_mib * MiB,
            prefill_tokens_per_s=25_000.0, host_bytes_per_s=25e9, redis_bytes_per_s=1e9,
        )  # fmt: skip
        with Runtime(engine, loaded.tokenizer, config) as rt:
            print(f"\n== {name}: pool {device_mib} MiB, host {host_mib} MiB")
            print("turn prompt cached  wall  restore prefill ttft decode commit (ms)")
            for t in range(args.turns):
                prompt = ids[: args.first + t * args.step]
                sync()
                w0 = time.perf_counter()
                if t == args.turns - 1:  # the last turn under cProfile: where the CPU goes
                    prof = cProfile.Profile()
                    r = prof.runcall(rt.generate, prompt, max_tokens=args.max_tokens)
                else:
                    r = rt.generate(prompt, max_tokens=args.max_tokens)
                sync()
                wall = time.perf_counter() - w0
                tm = r.timings
                print(
                    f"{t:4d} {len(prompt):6d} {r.usage.cached_tokens:6d} {wall * 1e3:6.0f}"
                    f" {tm.rehydrate_s * 1e3:7.1f} {tm.prefill_s * 1e3:7.1f}"
                    f" {tm.ttft_s * 1e3:5.0f} {tm.decode_s * 1e3:6.1f}"
                    f" {tm.commit_s * 1e3:6.1f}"
                )
            rt.cache.flush(30.0)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    # the engine alone: decode steps after a 12K prefill
    pre = engine.prefill(ids[: args.first])
    st = pre.state
    assert isinstance(st, TransformersState)
    for i in range(4):
        sync()
        w0 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine._forward(st.cache, [5], st.num_tokens)
        end.record()
        sync()
        wall = time.perf_counter() - w0
        st.token_ids.append(5)
        print(f"decode step {i} at {st.num_tokens}: wall {wall * 1e3:.1f} ms, "
              f"gpu {start.elapsed_time(end):.1f} ms")  # fmt: skip
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as step:
        engine._forward(st.cache, [5], st.num_tokens)
        sync()
    print(step.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(step.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
