"""Agent workload: concurrent agent sessions replayed under memory pressure, compared across
runtime configurations in one run (kvruntime.replay has the logic, this is the command).

Workloads: ``synthetic`` (kvruntime.trace: a shared system prompt with tool schemas, 85-95%
prefix overlap per turn, log-uniform tool waits, edited system prompts and compactions) and
``bfcl`` (the BFCL multi-turn tasks, kvruntime.bfcl). Configurations: ``recompute``
(``reuse=False``), ``device`` (a prefix cache on the device only), ``host`` (+ host tier),
``redis-int8`` / ``redis-int4`` (+ Redis with that codec). The device pool holds a quarter of the
workload's distinct KV, the host tier half of it (``--device-fraction``, ``--host-fraction``).

CPU (SmolLM2, writes its docs/BENCHMARKS.md section and docs/agent_workload_*_cpu.png):
    .venv/bin/python benchmarks/bench_agent_workload.py --workload synthetic,bfcl
GPU (a Llama-3.1-8B-shaped model with random weights made on the device; no tokenizer, so
prompts are token ids; no download):
    python benchmarks/bench_agent_workload.py --model llama8b-random --device cuda \\
        --sessions 16 --turns 5,15 --redis none --out $OUT/agent.json
The same code path on the CPU with a tiny random Llama of that structure:
    .venv/bin/python benchmarks/bench_agent_workload.py --tiny --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from record import markdown_table, print_table, record

from kvruntime import bfcl
from kvruntime.config import MiB, RuntimeConfig
from kvruntime.engines.chat import render
from kvruntime.engines.models import LoadedModel, canonical_config, kv_shape, load_model
from kvruntime.engines.transformers import TransformersEngine
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
    working_set_pages,
)
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
    "llama8b": (25_000.0, 6e9, 1e9),  # H200: 1K-32K prefill 28K-24K tok/s, pageable copies
}


class IdTokenizer:
    """Stands in for a tokenizer where the model has none: ids print as numbers."""

    chat_template = None

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def random_llama(shape: str, device: str, seed: int = 0) -> LoadedModel:
    """A Llama of ``LLAMA_SHAPES[shape]`` with random weights, made on ``device``, in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **LLAMA_SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    # seeded weights are a function of (config, seed): no need to hash 16 GB of them
    body = json.dumps({"random": shape, "seed": seed, "config": canonical_config(config),
                       "dtype": "bfloat16"}, sort_keys=True)  # fmt: skip
    return LoadedModel(
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
    tasks = bfcl.load_tasks()
    chats_ = bfcl.sessions(tasks, args.seed, args.max_tokens or 32)
    render_chat = ids.chat if token_model else (lambda m, t: render(tok, m, t))
    every = from_chats(chats_, render_chat, limit)
    # the tasks with the shortest first prompt (small tool sets) when fewer are asked for
    every.sort(key=lambda s: (len(s.turns[0].tokens), s.session_id))
    return every[: args.bfcl_tasks or len(every)]


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
        "working_set_tokens": working_set_pages(sessions, page_size) * page_size,
    }


@contextlib.contextmanager
def redis_url(choice: str) -> Iterator[str | None]:
    if choice == "none":
        yield None
    elif choice == "local":
        from kvruntime.errors import StoreUnavailable
        from kvruntime.local_redis import LocalRedis

        try:
            server = LocalRedis().start()
        except StoreUnavailable as exc:
            print(f"no Redis ({exc}); Redis configurations skipped", flush=True)
            yield None
            return
        try:
            yield server.url
        finally:
            server.stop()
    else:
        yield choice


def table(results: dict[str, ReplayResult]) -> tuple[list[str], list[list[object]]]:
    headers = [
        "config", "turns", "reuse", "device tok", "host tok", "redis tok", "TTFT p50 ms",
        "TTFT p90 ms", "service p50 ms", "service p90 ms", "prompt tok/s", "wall s",
        "host MB read", "redis MB read", "vs recompute",
    ]  # fmt: skip
    base = results.get("recompute")
    base_mean = base.summary().ttft_mean_s if base else None
    rows: list[list[object]] = []
    for name, res in results.items():
        s = res.summary()
        by, moved = s.cached_tokens_by_tier, s.bytes_moved
        ratio = f"{base_mean / s.ttft_mean_s:.2f}x" if base_mean and s.ttft_mean_s else "-"
        rows.append([
            name, s.turns, f"{s.reuse:.0%}", by["device"], by["host"], by["redis"],
            s.ttft_p50_s * 1e3, s.ttft_p90_s * 1e3, s.service_ttft_p50_s * 1e3,
            s.service_ttft_p90_s * 1e3, s.prompt_tokens_per_s, s.wall_s,
            moved["host"] / MiB, moved["redis"] / MiB, ratio,
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
    p.add_argument("--sessions", type=int, default=0, help="synthetic: concurrent sessions")
    p.add_argument("--turns", default="", help="synthetic: LO,HI turns per session")
    p.add_argument("--size", type=float, default=1.0, help="synthetic: token lengths x SIZE")
    p.add_argument("--max-tokens", type=int, default=0, help="output tokens per turn")
    p.add_argument("--bfcl-tasks", type=int, default=0, help="bfcl: the N shortest tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=0.1, help="tool waits slept x SCALE")
    p.add_argument("--device-fraction", type=float, default=0.25)
    p.add_argument("--host-fraction", type=float, default=0.5)
    p.add_argument("--configs", default=",".join(CONFIG_NAMES))
    p.add_argument("--redis", default="local", help="local (start a redis-server), none, or a URL")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--calibrate", action="store_true", help="measure the cost model at start")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--out", default="", help="write summaries and per-turn rows as JSON here")
    p.add_argument("--no-record", action="store_true", help="leave docs/ untouched")
    p.add_argument("--from-json", default="", help="publish a saved --out file (tables, plots, "
                   "docs section) without running")  # fmt: skip
    return p.parse_args()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Replay every workload under every configuration; returns what ``publish`` needs."""
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared CPU: fewer threads spin less
    shape = "tiny" if args.tiny else ("llama8b" if args.model == "llama8b-random" else "")
    loaded = random_llama(shape, args.device) if shape else load_model(args.model, args.device)
    engine = TransformersEngine(loaded)
    prefill, host_bps, redis_bps = COST.get(shape or args.model, (None, None, None))
    cost: dict[str, Any] = {}
    if not args.calibrate and prefill is not None:
        cost = dict(prefill_tokens_per_s=prefill, host_bytes_per_s=host_bps,
                    redis_bytes_per_s=redis_bps)  # fmt: skip
    layout = loaded.layout.page_layout(args.page_size, loaded.dtype)
    runs: dict[str, dict[str, ReplayResult]] = {}
    notes: list[str] = []
    load = os.getloadavg()[0]
    with redis_url(args.redis) as url:
        for workload in [w.strip() for w in args.workload.split(",") if w.strip()]:
            sessions = build_sessions(args, workload, loaded)
            info = describe(sessions, args.page_size)
            ws_bytes = int(info["working_set_tokens"]) * layout.bytes_per_token
            base = RuntimeConfig(device=args.device, page_size=args.page_size,
                                 max_queue=max(64, 2 * len(sessions)), **cost)  # fmt: skip
            names = [n.strip() for n in args.configs.split(",") if n.strip()]
            configs = comparison_configs(
                base, ws_bytes, url, args.device_fraction, args.host_fraction, names
            )
            note = (
                f"{workload}: {info['sessions']} sessions, {info['turns']} turns, "
                f"{info['prompt_tokens']:,} prompt tokens (mean {info['mean_prompt']:.0f}, max "
                f"{info['max_prompt']}), mean overlap with the previous prompt "
                f"{info['mean_overlap']:.1%} on append turns, {info['breaks']} prefix breaks; "
                f"distinct KV {info['working_set_tokens']:,} tokens = {ws_bytes / MiB:.0f} MiB"
            )
            print(note, flush=True)
            notes.append(note)

            def progress(name: str, res: ReplayResult) -> None:
                s = res.summary()
                print(f"  {name}: {s.turns} turns in {s.wall_s:.1f} s, reuse {s.reuse:.0%}, "
                      f"errors {s.errors}", flush=True)  # fmt: skip

            runs[workload] = compare(
                engine, loaded.tokenizer, sessions, configs,
                ReplayConfig(time_scale=args.time_scale), progress,
            )  # fmt: skip
    meta = {
        "model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
        "label": "SmolLM2" if args.model == "smollm2" and not shape
        else "Llama-3.1-8B-shaped, random weights",
        "tag": "cpu" if args.device == "cpu" else "gpu", "threads": torch.get_num_threads(),
        "page_size": args.page_size, "time_scale": args.time_scale,
        "device_fraction": args.device_fraction, "host_fraction": args.host_fraction,
        "redis": url is not None, "cost": cost or "calibrated at start",
        "load_before": load, "load_after": os.getloadavg()[0], "tiny": shape == "tiny",
        "command": "python benchmarks/bench_agent_workload.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    return {"meta": meta, "notes": notes, "runs": runs}


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
    return {**saved, "runs": runs}


def publish(data: dict[str, Any], write_docs: bool) -> int:
    """Print the tables; with ``write_docs``, plot and write the docs/BENCHMARKS.md section."""
    meta, notes, runs = data["meta"], data["notes"], data["runs"]
    body_parts = []
    for workload, results in runs.items():
        headers, rows = table(results)
        print(f"\n{workload}")
        print_table(headers, rows)
        body_parts.append(f"**{workload}**\n\n" + markdown_table(headers, rows))
    errors = sum(len(r.errors) for res in runs.values() for r in res.values())
    if not write_docs:
        return 1 if errors else 0
    paths = plot(runs, meta["tag"])
    redis = "a local redis-server" if meta["redis"] else "not used"
    body = (
        f"{meta['model']} ({meta['dtype']}), page size {meta['page_size']}, {meta['threads']} "
        f"torch threads, tool waits slept x{meta['time_scale']:g}, sessions concurrent (a "
        f"thread each, one engine). The device pool holds {meta['device_fraction']:g} of the "
        f"workload's distinct KV, the host tier {meta['host_fraction']:g} (codec none); Redis: "
        f"{redis}. Cost model: {meta['cost']}. *TTFT*: submission to first token, queueing "
        "behind other sessions included; *service*: once the engine took the turn. *prompt "
        "tok/s*: prompt tokens served per second of the run. *MB read*: KV read from the tier "
        "(after its codec). *vs recompute*: mean TTFT of `reuse=False` / this mean TTFT. Load "
        f"average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after (the machine "
        "may be shared).\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n\n" + "\n\n".join(body_parts) + "\n\n"
        + "Plots: " + ", ".join(f"`docs/{q.name}`" for q in paths)
    )  # fmt: skip
    record(f"agent workload ({meta['tag'].upper()}, {meta['label']})", body, meta["command"])
    print(f"wrote {', '.join(str(q) for q in paths)} and docs/BENCHMARKS.md", flush=True)
    return 1 if errors else 0


def main() -> int:
    args = parse_args()
    if args.from_json:
        return publish(from_json(json.loads(Path(args.from_json).read_text())), True)
    data = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(to_json(data), indent=1))
    return publish(data, not (args.no_record or data["meta"]["tiny"]))


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - started:.0f} s")
    sys.exit(code)
