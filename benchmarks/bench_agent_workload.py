"""Agent workload: concurrent agent sessions replayed under memory pressure, compared across
runtime configurations in one run (kvruntime.replay has the logic, this is the command).

Workloads: ``synthetic`` (kvruntime.trace: a shared system prompt with tool schemas, 85-95%
prefix overlap per turn, log-uniform tool waits, edited system prompts and compactions) and
``bfcl`` (the BFCL multi-turn tasks, kvruntime.bfcl). Configurations: ``recompute``
(``reuse=False``), ``device`` (a prefix cache in the device pool only: evicted pages are gone,
like a GPU-resident radix cache), ``host`` (+ host tier), ``redis-int8`` / ``redis-int4``
(+ Redis with that codec). Memory pressure: the device pool holds ``--device-fraction`` (a
quarter) of the workload's live KV (the most its sessions hold at one time, shared pages once:
``replay.live_kv_pages``), the host tier ``--host-fraction`` (half); Redis is unbounded.

CPU (SmolLM2; writes its docs/BENCHMARKS.md section and docs/agent_workload_*_cpu.png):
    .venv/bin/python benchmarks/bench_agent_workload.py --workload synthetic,bfcl --threads 2
GPU (a Llama-3.1-8B-shaped model, random bf16 weights made on the device; prompts are token
ids, no tokenizer, no download). Run there with ``--out``, publish here with ``--from-json``:
    python benchmarks/bench_agent_workload.py --model llama8b-random --device cuda \\
        --workload synthetic,bfcl --time-scale synthetic=0.3,bfcl=0.1 --out $OUT/agent.json \\
        --budget-s 360
    .venv/bin/python benchmarks/bench_agent_workload.py --from-json agent.json
(docs/agent_workload.md, "Reproduce": the H200 runs' exact commands, Redis included.)
``--plan`` prints the workloads and budgets without replaying. ``--tiny``: the GPU code path
with a tiny random Llama of the same structure (runs on the CPU; tests use it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import record as record_module
import torch
from record import markdown_table, print_table, record

from kvruntime import bfcl
from kvruntime.config import MiB, RuntimeConfig
from kvruntime.engines.chat import render
from kvruntime.engines.models import LoadedModel, canonical_config, kv_shape, load_model
from kvruntime.engines.transformers import EngineConfig, TransformersEngine
from kvruntime.replay import (
    CONFIG_NAMES,
    ReplayConfig,
    ReplayResult,
    ReplaySession,
    TurnRow,
    compare,
    comparison_configs,
    from_chats,
    from_trace,
    live_kv_pages,
    replay,
    working_set_pages,
)
from kvruntime.runtime import Runtime
from kvruntime.trace import TextRenderer, TokenRenderer, TraceConfig, common_prefix, generate

DOCS = Path(__file__).resolve().parent.parent / "docs"
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B: 32 layers, 32 heads, 8 KV heads of 128, hidden 4096, MLP 14336
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0),
    # the same structure (GQA 4:1, MLP 3.5x hidden), small enough for a CPU test
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=16384, rope_theta=500000.0),
}  # fmt: skip
# fixed cost-model figures (prefill tokens/s, host and Redis bytes/s), measured on each machine
COST = {
    "smollm2": (500.0, 2e9, 5e8),  # 2-core CPU (docs/BENCHMARKS.md, TTFT on the CPU)
    # H200: 1K-32K prefill 28K-24K tok/s; host restore from pinned rows ~50 GB/s by the kernel,
    # half of it counted for the engine's copy into its caches; Redis: the loopback client
    "llama8b": (25_000.0, 25e9, 1e9),
}
# the run's defaults per device: on the GPU longer sessions (prompts up to 32K) and outputs
# of 2 tokens (the engine decodes one session at a time, ~120 tok/s at 12K on the H200)
DEFAULTS = {
    "cpu": {"sessions": 0, "turns": "", "max_tokens": 8, "bfcl_tasks": 4, "chunk": 0},
    "cuda": {"sessions": 8, "turns": "5,30", "max_tokens": 2, "bfcl_tasks": 8,
             "chunk": 16384},
}  # fmt: skip


class IdTokenizer:
    """Stands in for a tokenizer where the model has none: ids print as numbers."""

    chat_template = None

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def random_llama(shape: str, device: str, seed: int = 0) -> tuple[LoadedModel, float]:
    """A Llama of ``LLAMA_SHAPES[shape]`` with random weights made on ``device`` in bf16 (no
    fp32 copy, nothing on the CPU); returns it and the seconds its making took."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **LLAMA_SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model: Any = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - started
    # seeded weights are a function of (config, seed): no need to hash 16 GB of them
    body = json.dumps({"random": shape, "seed": seed, "config": canonical_config(config),
                       "dtype": "bfloat16"}, sort_keys=True)  # fmt: skip
    loaded = LoadedModel(
        name=f"{shape}-random",
        model=model,
        tokenizer=IdTokenizer(eos_token_id=2),
        layout=kv_shape(config),
        fingerprint=hashlib.blake2b(body.encode(), digest_size=16).hexdigest(),
        max_context=int(config.max_position_embeddings),
        dtype=model.dtype,
        device=model.device,
        source_dir=Path("."),
    )
    return loaded, init_s


def build_sessions(
    args: argparse.Namespace, workload: str, loaded: LoadedModel
) -> list[ReplaySession]:
    tok = loaded.tokenizer
    limit = loaded.max_context - 1
    token_model = isinstance(tok, IdTokenizer)
    ids = TokenRenderer(loaded.model.config.vocab_size)
    if workload == "synthetic":
        base = TraceConfig.cpu(args.seed) if args.device == "cpu" else TraceConfig(seed=args.seed)
        fields: dict[str, Any] = {}
        if args.sessions:
            fields["sessions"] = args.sessions
        if args.turns:
            fields["turns"] = tuple(int(x) for x in args.turns.split(","))
        if args.max_tokens:
            fields["output_tokens"] = args.max_tokens
        trace_config = dataclasses.replace(base, **fields).scaled(args.size)
        trace = generate(trace_config)
        if token_model:
            return from_trace(trace, ids)
        chats = TextRenderer.fit(lambda s: len(tok.encode(s, add_special_tokens=False)))
        return from_chats(chats.sessions(trace), lambda m, t: render(tok, m, t), limit)
    if workload != "bfcl":
        raise SystemExit(f"unknown workload {workload!r}: synthetic or bfcl")
    tasks = bfcl.load_tasks()
    chats_ = bfcl.sessions(tasks, args.seed, args.max_tokens or 8)
    render_chat = ids.chat if token_model else (lambda m, t: render(tok, m, t))
    every = from_chats(chats_, render_chat, limit)
    # the tasks with the shortest first prompt (small tool sets) when fewer are asked for
    every.sort(key=lambda s: (len(s.turns[0].tokens), s.session_id))
    steps = args.bfcl_steps or None
    return [dataclasses.replace(s, turns=s.turns[:steps]) for s in every[: args.bfcl_tasks or None]]


def describe(sessions: list[ReplaySession], page_size: int) -> dict[str, float]:
    prompts = [len(t.tokens) for s in sessions for t in s.turns]
    overlaps = [
        common_prefix(a.tokens, b.tokens) / len(b.tokens)
        for s in sessions
        for a, b in zip(s.turns, s.turns[1:], strict=False)
        if b.event in ("tool", "user")
    ]
    return {
        "sessions": len(sessions),
        "turns": len(prompts),
        "prompt_tokens": sum(prompts),
        "mean_prompt": sum(prompts) / len(prompts),
        "max_prompt": max(prompts),
        "mean_overlap": sum(overlaps) / max(len(overlaps), 1),
        "breaks": sum(t.event in ("edit", "compact") for s in sessions for t in s.turns),
        "live_kv_tokens": live_kv_pages(sessions, page_size) * page_size,
        "all_kv_tokens": working_set_pages(sessions, page_size) * page_size,
    }


def warm_sessions(vocab_size: int) -> list[ReplaySession]:
    """Two short sessions to compile the device kernels (Triton) before anything is timed."""
    small = TraceConfig(seed=12345, sessions=2, turns=(3, 3), system_tokens=512, tools=4,
                        task_tokens=(32, 64), call_tokens=(8, 16), max_prompt_tokens=4096,
                        output_tokens=2, arrival_s=0.0, edit_prob=0.0)  # fmt: skip
    return from_trace(generate(small), TokenRenderer(vocab_size))


def warm_up(
    engine: TransformersEngine, tokenizer: Any, configs: dict[str, RuntimeConfig], vocab: int
) -> float:
    """Replay ``warm_sessions`` once per configuration under pressure of its own (device pool
    a quarter of it), so every tier's kernels are compiled (and the engine's CUDA graphs
    captured) before the timed replays."""
    started = time.perf_counter()
    if engine.piecewise is not None:
        engine.piecewise.capture_all()
    sessions = warm_sessions(vocab)
    layout = engine.layout.page_layout(next(iter(configs.values())).page_size, engine.dtype)
    live = live_kv_pages(sessions, layout.page_size) * layout.page_nbytes
    for name, config in configs.items():
        warm = dataclasses.replace(
            config,
            device_kv_bytes=max(layout.page_nbytes, live // 4),
            host_kv_bytes=live if config.host_kv_bytes else 0,
            redis_namespace=f"{config.redis_namespace}-warm",
        )
        with Runtime(engine, tokenizer, warm) as rt:
            result = replay(rt, sessions)
        if result.errors:
            raise SystemExit(f"warm-up of {name} failed: {result.errors[0]}")
    return time.perf_counter() - started


@contextlib.contextmanager
def redis_url(choice: str) -> Iterator[tuple[str | None, str]]:
    """(url, what it is) of the Redis to use: none, a redis-server started here, or a URL."""
    if choice == "none":
        yield None, "not used"
    elif choice == "local":
        from kvruntime.errors import StoreUnavailable
        from kvruntime.local_redis import LocalRedis

        try:
            server = LocalRedis().start()
        except StoreUnavailable as exc:
            print(f"no Redis ({exc}); Redis configurations skipped", flush=True)
            yield None, f"not available ({exc})"
            return
        try:
            version = subprocess.run(
                [server.binary, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.split()
            v = next((w[2:] for w in version if w.startswith("v=")), "?")
            yield server.url, f"a local redis-server {v} on loopback, started by the run"
        finally:
            server.stop()
    else:
        yield choice, choice


def table(results: dict[str, ReplayResult]) -> tuple[list[str], list[list[object]]]:
    headers = [
        "config", "turns", "reuse", "device tok", "host tok", "redis tok", "TTFT mean ms",
        "TTFT p50 ms", "TTFT p99 ms", "service mean ms", "service p99 ms", "engine ms/turn",
        "prompt tok/s", "wall s", "host MB read", "redis MB read", "vs device", "vs recompute",
    ]  # fmt: skip
    means = {n: r.summary().ttft_mean_s for n, r in results.items()}

    def ratio(base: str, name: str) -> str:
        b, m = means.get(base), means[name]
        return f"{b / m:.2f}x" if b and m else "-"

    rows: list[list[object]] = []
    for name, res in results.items():
        s = res.summary()
        by, moved = s.cached_tokens_by_tier, s.bytes_moved
        rows.append([
            name, s.turns, f"{s.reuse:.0%}", by["device"], by["host"], by["redis"],
            s.ttft_mean_s * 1e3, s.ttft_p50_s * 1e3, s.ttft_p99_s * 1e3,
            s.service_ttft_mean_s * 1e3, s.service_ttft_p99_s * 1e3, s.engine_mean_s * 1e3,
            s.prompt_tokens_per_s,
            s.wall_s, moved["host"] / MiB, moved["redis"] / MiB, ratio("device", name),
            ratio("recompute", name),
        ])  # fmt: skip
    return headers, rows


def plot(runs: dict[str, dict[str, ReplayResult]], tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [DOCS / f"agent_workload_ttft_{tag}.png", DOCS / f"agent_workload_reuse_{tag}.png"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for row, (workload, results) in zip(axes, runs.items(), strict=True):
        for ax, service in zip(row, (False, True), strict=True):
            for name, res in results.items():
                xs = sorted(r.service_ttft_s if service else r.ttft_s for r in res.rows)
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("seconds")
            ax.set_ylabel("fraction of turns")
            what = "service TTFT (engine time)" if service else "TTFT (queueing included)"
            ax.set_title(f"{workload}: {what}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, (workload, results) in zip(axes[0], runs.items(), strict=True):
        names = list(results)
        sums = [r.summary() for r in results.values()]
        bottom = [0.0] * len(names)
        for tier in ("device", "host", "redis", "computed"):
            vals = [
                (s.prompt_tokens - s.cached_tokens if tier == "computed"
                 else s.cached_tokens_by_tier[tier]) / max(s.prompt_tokens, 1)
                for s in sums
            ]  # fmt: skip
            ax.bar(names, vals, bottom=bottom, label=tier)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("share of prompt tokens")
        ax.set_title(f"{workload}: where prompt tokens came from")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b-random"])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (llama8b structure)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workload", default="synthetic", help="synthetic, bfcl or both (comma)")
    p.add_argument("--sessions", type=int, default=None, help="synthetic: concurrent sessions")
    p.add_argument("--turns", default=None, help="synthetic: LO,HI turns per session")
    p.add_argument("--size", type=float, default=1.0, help="synthetic: token lengths x SIZE")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per turn")
    p.add_argument("--bfcl-tasks", type=int, default=None, help="bfcl: the N shortest tasks")
    p.add_argument("--bfcl-steps", type=int, default=0, help="bfcl: a task's first N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", default="0.1", help="tool waits slept x SCALE; one "
                   "SCALE or one per workload: synthetic=1,bfcl=0.1")  # fmt: skip
    p.add_argument("--device-fraction", type=float, default=0.25)
    p.add_argument("--host-fraction", type=float, default=0.5)
    p.add_argument("--configs", default=",".join(CONFIG_NAMES))
    p.add_argument("--redis", default="local", help="local (start a redis-server), none, or a URL")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=None, help="engine prefill chunk tokens")
    p.add_argument("--calibrate", action="store_true", help="measure the cost model at start")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="skip configurations not started within this many seconds",
    )
    p.add_argument("--plan", action="store_true", help="print workloads and budgets, no replay")
    p.add_argument(
        "--out",
        default="",
        help="write summaries and per-turn rows as JSON here (rewritten after every configuration)",
    )
    p.add_argument("--no-record", action="store_true", help="leave docs/ untouched")
    p.add_argument("--note", default="", help="a paragraph for the docs section (findings)")
    p.add_argument(
        "--from-json",
        default="",
        help="publish saved --out files (comma: their "
        "workloads merged) as tables, plots and the docs section, without running",
    )
    args = p.parse_args()
    defaults = DEFAULTS["cpu" if args.device == "cpu" else "cuda"]
    for name, value in defaults.items():
        key = "prefill_chunk" if name == "chunk" else name
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Replay every workload under every configuration; returns what ``publish`` needs."""
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared CPU: fewer threads spin less
    shape = "tiny" if args.tiny else ("llama8b" if args.model == "llama8b-random" else "")
    init_s = None
    if shape:
        loaded, init_s = random_llama(shape, args.device)
        print(f"random {shape} made on {args.device} in {init_s:.1f} s", flush=True)
    else:
        loaded = load_model(args.model, args.device)
    chunk = {"prefill_chunk_tokens": args.prefill_chunk} if args.prefill_chunk else {}
    engine = TransformersEngine(loaded, EngineConfig(**chunk))
    prefill, host_bps, redis_bps = COST.get(shape or args.model, (None, None, None))
    cost: dict[str, Any] = {}
    if not args.calibrate and prefill is not None:
        cost = dict(prefill_tokens_per_s=prefill, host_bytes_per_s=host_bps,
                    redis_bytes_per_s=redis_bps)  # fmt: skip
    layout = loaded.layout.page_layout(args.page_size, loaded.dtype)
    hardware = "CPU"
    if args.device != "cpu":
        hardware = torch.cuda.get_device_name(0).removeprefix("NVIDIA ")
    meta: dict[str, Any] = {
        "model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
        "label": "SmolLM2" if not shape else "Llama-8B shape" if shape == "llama8b" else "tiny",
        "hardware": hardware, "tag": "cpu" if args.device == "cpu" else "gpu",
        "machine": record_module.machine(), "threads": torch.get_num_threads(),
        "page_size": args.page_size, "time_scale": args.time_scale,
        "max_tokens": args.max_tokens, "prefill_chunk": engine.config.prefill_chunk_tokens,
        "device_fraction": args.device_fraction, "host_fraction": args.host_fraction,
        "cost": cost or "calibrated at start", "model_init_s": init_s,
        "load_before": os.getloadavg()[0], "tiny": shape == "tiny",
        "command": "python benchmarks/bench_agent_workload.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    data: dict[str, Any] = {"meta": meta, "workloads": {}, "runs": {}, "skipped": []}
    with redis_url(args.redis) as (url, redis_what):
        meta["redis"] = redis_what
        for workload in [w.strip() for w in args.workload.split(",") if w.strip()]:
            sessions = build_sessions(args, workload, loaded)
            info = describe(sessions, args.page_size)
            live = int(info["live_kv_tokens"]) * layout.bytes_per_token
            base = RuntimeConfig(device=args.device, page_size=args.page_size,
                                 max_queue=max(64, 2 * len(sessions)), **cost)  # fmt: skip
            names = [n.strip() for n in args.configs.split(",") if n.strip()]
            configs = comparison_configs(
                base, live, url, args.device_fraction, args.host_fraction, names
            )
            some = next(iter(configs.values()))
            info.update(
                time_scale=time_scale(args.time_scale, workload), live_kv_bytes=live,
                device_kv_bytes=some.device_kv_bytes, host_kv_bytes=int(live * args.host_fraction),
            )  # fmt: skip
            data["workloads"][workload] = info
            print(note(workload, info), flush=True)
            if args.plan:
                continue
            # the GPU path (and --tiny, its CPU stand-in) compiles kernels on first use
            if (args.device != "cpu" or shape == "tiny") and "warm_up_s" not in meta:
                meta["warm_up_s"] = warm_up(engine, loaded.tokenizer, configs, ids_vocab(loaded))
                print(f"warm-up (kernel compilation) {meta['warm_up_s']:.1f} s", flush=True)
            results: dict[str, ReplayResult] = {}
            data["runs"][workload] = results
            for name, config in configs.items():
                elapsed = time.perf_counter() - started
                if args.budget_s and elapsed > args.budget_s:
                    print(f"  {name}: skipped ({elapsed:.0f} s > budget)", flush=True)
                    data["skipped"].append(f"{workload}/{name}")
                    continue
                one = compare(
                    engine, loaded.tokenizer, sessions, {name: config},
                    ReplayConfig(time_scale=info["time_scale"]),
                )  # fmt: skip
                results[name] = one[name]
                s = one[name].summary()
                print(f"  {name}: {s.turns} turns in {s.wall_s:.1f} s, reuse {s.reuse:.0%}, "
                      f"TTFT mean {s.ttft_mean_s * 1e3:.0f} ms (service "
                      f"{s.service_ttft_mean_s * 1e3:.0f} ms), engine {s.engine_mean_s * 1e3:.0f} "
                      f"ms/turn (commit {s.commit_mean_s * 1e3:.0f}), errors {s.errors}",
                      flush=True)  # fmt: skip
                meta["load_after"] = os.getloadavg()[0]
                meta["run_s"] = time.perf_counter() - started
                if args.out:
                    Path(args.out).write_text(json.dumps(to_json(data), indent=1))
    return data


def time_scale(spec: str, workload: str) -> float:
    """``--time-scale``: one factor (``0.1``) or one per workload (``synthetic=1,bfcl=0.1``;
    a workload not named replays its waits in real time)."""
    if "=" not in spec:
        return float(spec)
    pairs = dict(p.split("=", 1) for p in spec.split(",") if p.strip())
    return float(pairs.get(workload, 1.0))


def ids_vocab(loaded: LoadedModel) -> int:
    return int(loaded.model.config.vocab_size)


def note(workload: str, info: dict[str, Any]) -> str:
    return (
        f"{workload}: {info['sessions']} sessions, {info['turns']} turns, "
        f"{info['prompt_tokens']:,} prompt tokens (mean {info['mean_prompt']:.0f}, max "
        f"{info['max_prompt']}), mean overlap with the previous prompt "
        f"{info['mean_overlap']:.1%} on append turns, {info['breaks']} prefix breaks "
        f"(edits, compactions; {info['all_kv_tokens']:,} distinct tokens of KV in all). Live "
        f"KV {info['live_kv_tokens']:,} tokens = {info['live_kv_bytes'] / MiB:,.0f} MiB; device "
        f"pool {info['device_kv_bytes'] / MiB:,.0f} MiB = "
        f"{info['device_kv_bytes'] / info['live_kv_bytes']:.2f} of it; host tier "
        f"{info['host_kv_bytes'] / MiB:,.0f} MiB. Tool waits slept x{info['time_scale']:g} of "
        "the trace's"
    )


def to_json(data: dict[str, Any]) -> dict[str, Any]:
    runs = {
        w: {n: {"wall_s": r.wall_s, "errors": list(r.errors), "summary": r.summary()._asdict(),
                "rows": [x._asdict() for x in r.rows]} for n, r in res.items()}
        for w, res in data["runs"].items()
    }  # fmt: skip
    return {**data, "runs": runs}


def from_json(saved: dict[str, Any]) -> dict[str, Any]:
    runs = {
        w: {n: ReplayResult(tuple(TurnRow(**x) for x in r["rows"]), r["wall_s"],
                            tuple(r["errors"])) for n, r in res.items()}
        for w, res in saved["runs"].items()
    }  # fmt: skip
    for w, info in saved["workloads"].items():  # files saved before per-workload scales
        info.setdefault("time_scale", time_scale(str(saved["meta"]["time_scale"]), w))
    return {**saved, "runs": runs}


def merge(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs saved separately (one workload each, say) as one: the first one's settings, the
    later ones' workloads added (a workload saved twice: the later run)."""
    out = {**saved[0], "workloads": {}, "runs": {}, "skipped": []}
    for one in saved:
        if one["meta"]["tag"] != out["meta"]["tag"] or one["meta"]["model"] != out["meta"]["model"]:
            raise SystemExit("--from-json: the files come from different machines or models")
        out["workloads"].update(one["workloads"])
        out["runs"].update(one["runs"])
        out["skipped"] += one.get("skipped", [])
    commands = list(dict.fromkeys(one["meta"]["command"] for one in saved))
    out["meta"] = {**out["meta"], "command": "`; `".join(commands)}
    return out


@contextlib.contextmanager
def measured_on(machine: str) -> Iterator[None]:
    """record() names the machine it runs on; a run published from its JSON ran elsewhere."""
    own = record_module.machine
    record_module.machine = lambda: machine
    try:
        yield
    finally:
        record_module.machine = own


def publish(data: dict[str, Any], write_docs: bool, from_file: str = "", note_: str = "") -> int:
    """Print the tables; with ``write_docs``, plot and write the docs/BENCHMARKS.md section."""
    meta, runs = data["meta"], {w: r for w, r in data["runs"].items() if r}
    body_parts = []
    for workload, results in runs.items():
        headers, rows = table(results)
        print(f"\n{workload}")
        print_table(headers, rows)
        info = data["workloads"][workload]
        body_parts.append(f"**{workload}** — {note(workload, info)}.\n\n"
                          + markdown_table(headers, rows))  # fmt: skip
    errors = sum(len(r.errors) for res in runs.values() for r in res.values())
    if not write_docs or not runs:
        return 1 if errors else 0
    paths = plot(runs, meta["tag"])
    skipped = ", ".join(data.get("skipped", ())) or "none"
    made = meta.get("model_init_s")
    init = f"; random weights made on the device in {made:.1f} s" if made else ""
    body = (
        f"{meta['model']} ({meta['dtype']}{init}), page size {meta['page_size']}, "
        f"{meta['threads']} torch threads, prefill in chunks of {meta['prefill_chunk']} tokens. "
        "Sessions run concurrently (a thread each) on one engine that runs one turn at a time, "
        "each sleeping its tool waits (scaled per workload, below) between turns; outputs of "
        f"{meta['max_tokens']} tokens per turn (the engine decodes one session at a time, so "
        "long outputs would measure its decode loop, the same in every configuration, rather "
        "than the cache). **Memory pressure**: the device pool holds "
        f"{meta['device_fraction']:g} of the workload's live KV (the most the sessions hold "
        "at one time: the peak over turn steps of the pages of every running session's "
        "current prompt, shared pages once; figures per workload below), the host tier "
        f"{meta['host_fraction']:g} (codec none); Redis: {meta['redis']}, unbounded. "
        "Configurations: *recompute* `reuse=False`; *device* a prefix cache in the device pool "
        "only (evicted pages are dropped, like a GPU-resident radix cache); *host* + the host "
        "tier; *redis-int8/int4* + the Redis tier with that codec. Cost model (restore vs "
        f"recompute): {meta['cost']}. *TTFT*: submission to first token, queueing behind "
        "other sessions included; *service*: from when the engine took the turn. *prompt "
        "tok/s*: prompt tokens served per second of the run. *MB read*: KV read from the tier "
        "(after its codec). *vs device* / *vs recompute*: that configuration's mean TTFT / "
        f"this one's. Skipped for time: {skipped}. Load average {meta['load_before']:.1f} "
        f"before, {meta.get('load_after', 0.0):.1f} after (the machine may be shared).\n\n"
        + "\n\n".join(body_parts) + "\n\n" + (note_ + "\n\n" if note_ else "")
        + "Plots: " + ", ".join(f"`docs/{q.name}`" for q in paths)
    )  # fmt: skip
    command = meta["command"]
    if from_file:
        command += (
            f"` (saved with --out), published with `python benchmarks/bench_agent_workload.py "
            f"--from-json {from_file}"
        )
    with measured_on(meta["machine"]):
        record(f"agent workload ({meta['hardware']}, {meta['label']})", body, command)
    print(f"wrote {', '.join(str(q) for q in paths)} and docs/BENCHMARKS.md", flush=True)
    return 1 if errors else 0


def main() -> int:
    # a stopped run still stops the redis-server it started (finally blocks run on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    if args.from_json:
        files = [Path(f) for f in args.from_json.split(",")]
        saved = merge([from_json(json.loads(f.read_text())) for f in files])
        return publish(saved, not args.no_record, ",".join(f.name for f in files), args.note)
    data = run(args)
    if args.plan:
        return 0
    if args.out:
        Path(args.out).write_text(json.dumps(to_json(data), indent=1))
    return publish(data, not (args.no_record or data["meta"]["tiny"]), "", args.note)


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - started:.0f} s")
    sys.exit(code)
