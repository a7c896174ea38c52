"""Codec quality on a real model: SmolLM2-135M-Instruct over natural text and BFCL chat prompts.

For each sample (a token sequence and a split point) the prefix is prefilled exactly, its KV
exported as pages, and the pages encoded and decoded with each codec (``none`` is exact reuse).
On top of the restored prefix the engine then
- decodes the next 64 greedy tokens (no stop tokens): agreement with exact reuse;
- runs the held-out continuation teacher-forced (its exact tokens): KL(exact || codec) of the
  next-token distributions at every continuation position, and the continuation's perplexity.

Run: ``.venv/bin/python benchmarks/bench_codec_quality.py`` (``--quick`` for a smoke run)
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
from typing import Any, NamedTuple

import torch
from record import markdown_table, print_table, record

from kvruntime import bfcl
from kvruntime.engines.base import KVPrefix
from kvruntime.engines.chat import render
from kvruntime.engines.models import load_model
from kvruntime.engines.transformers import TransformersEngine, kv_from_pages
from kvruntime.store.codec import get_codec

CODECS = ("none", "fp8", "int8", "int4")
PAGE = 16
GREEDY = 64
CONTINUATION = 128

PASSAGES = [
    # a coastal town
    "The lighthouse at Carrow Point was built in 1851, after a winter in which three ships were "
    "lost on the reef within a month. For most of its life it was kept by a single family. The "
    "first keeper, a former ship's carpenter named Elias Penrose, lit the lamp every evening at "
    "sunset and trimmed the wicks twice each night, climbing the hundred and twelve steps with a "
    "can of oil in each hand. His logbook survives in the town library. It records the weather "
    "at every watch, the ships that passed, and the small events of a life on a rock: a seal "
    "that slept on the landing for a week, a storm that broke the lantern glass, the birth of a "
    "daughter during a gale in March. When Elias died, his son took over the light, and later "
    "his granddaughter, who kept it until the lamp was electrified in 1932 and the keepers were "
    "no longer needed. The town below the point changed more slowly than the light. Fishing "
    "remained the main trade until the harbour silted up after the war, and the boats moved to "
    "the deeper water at Porthallow. The sail loft became a gallery, the chapel a house, and the "
    "railway station, closed in 1964, a café that still keeps the old timetable on its wall. "
    "Visitors come in summer for the cliffs and the light, which is now a museum. In the lamp "
    "room, a volunteer explains how the lens works: a ring of glass prisms that bends the light "
    "of a small flame into a beam that could be seen twenty miles out at sea. On clear nights, "
    "the beam still turns, though it is no longer needed to guide the ships home.",
    # how dough rises
    "Bread rises because yeast eats sugar and breathes out gas. When flour and water are mixed, "
    "enzymes in the flour begin to break starch into simple sugars, and the yeast cells feed on "
    "them, producing carbon dioxide and a little alcohol. The gas would simply escape if it were "
    "not for gluten, a network of proteins that forms when the flour is wet and worked. "
    "Kneading stretches and aligns these proteins into sheets that trap the bubbles, so that "
    "the dough swells like a balloon made of many small rooms. Temperature controls the pace of "
    "all this. A warm kitchen makes a fast rise and a plain loaf; a cool one makes a slow rise, "
    "during which bacteria and enzymes have time to produce the acids and aromas that give good "
    "bread its flavour. This is why many bakers leave their dough in the refrigerator overnight. "
    "Salt slows the yeast down and tightens the gluten, so it is measured with care: too little "
    "and the dough is slack and bland, too much and it barely rises. In the oven, the trapped "
    "gas expands quickly in the first minutes, a burst bakers call oven spring, before the "
    "crust sets and the yeast dies. The starch then gelatinises, the proteins firm up, and the "
    "crumb takes its final shape. The crust browns through the same reactions that colour "
    "roasted coffee and seared meat, which is why it tastes so different from the pale crumb "
    "inside. A loaf that is cut too early is gummy, because the crumb is still setting as it "
    "cools; patience, in bread as in most things, is part of the recipe.",
    # a train journey
    "The night train left the city a few minutes after ten. Marta had a compartment to herself "
    "for the first hour, and she spent it watching the lights of the suburbs thin out into "
    "fields and then into darkness. At the first stop an old man got on with a wicker basket "
    "and a folded newspaper. He nodded to her, sat by the window, and began to peel an orange "
    "with great care, as though it were a task that deserved his full attention. The smell of "
    "it filled the small room. After a while he offered her half. She accepted, and they "
    "talked, first about the weather and the delays on the line, then about where they were "
    "going. He was visiting his sister, whom he had not seen in eleven years. They had "
    "quarrelled about a house, he said, and neither of them could now remember exactly why. "
    "Marta told him she was going to start a new job in a town she had never seen. He asked "
    "whether she was afraid, and she said yes, a little, and he said that was the right amount. "
    "Around midnight the conductor came through to check tickets and turn down the lights. The "
    "old man fell asleep with the newspaper on his knees. Marta lay awake listening to the "
    "wheels, counting the rhythm of the joints in the rails, until the train slowed for the "
    "border and men with torches walked along the platform outside. When she woke it was "
    "light, the man was gone, and on the seat beside her he had left the rest of the oranges.",
    # caching in a database
    "A database keeps its most recently used pages in memory because reading from disk is "
    "slow. The buffer pool is a fixed number of frames, each holding one page, and a table maps "
    "page numbers to frames. When a query needs a page, the engine looks it up in the table; if "
    "the page is there, the read costs almost nothing, and if it is not, a frame must be freed "
    "and the page read from disk. Which frame to free is the central question. Least recently "
    "used is the classic answer, but a single large scan can flush every useful page out of "
    "memory, so real systems add refinements: they keep two lists and promote pages only on a "
    "second access, or they track how often each page was used over a window of time. Dirty "
    "pages, those changed since they were read, cannot simply be dropped; they must first be "
    "written back, which is why a background writer flushes them ahead of need. A page that a "
    "query is still reading is pinned, and the replacement policy must skip it. The same ideas "
    "reappear wherever a small fast memory sits in front of a large slow one: processor caches, "
    "operating system page caches, content delivery networks, and the key and value caches of "
    "language model servers, which keep the attention state of previous tokens so that a long "
    "conversation does not have to be recomputed from the start at every turn. In each case the "
    "cache pays off only when the cost of a miss is high and the pattern of reuse is strong.",
    # a planning note
    "Hi all, a short note on the plan for next quarter, so we can discuss it on Thursday. "
    "First, the migration. We will move the reporting jobs to the new cluster in two steps: the "
    "nightly batch first, in the second week of the month, and the hourly jobs after we have "
    "run both systems side by side for at least ten days and compared the outputs. Priya will "
    "own the comparison and will send a summary of any differences each morning. Second, the "
    "on-call rota. Several people asked for fewer night shifts, and we can do that if we add two "
    "more names to the rota and move the weekly handover from Monday morning to Friday "
    "afternoon, when the release freeze starts. Please tell me by the end of the week if you "
    "would like to join. Third, the budget. We have enough for the hardware we planned, but not "
    "for the extra storage that the analytics team asked for. I suggest we first measure how "
    "much of the current storage holds data nobody has read in a year; my guess is that it is "
    "more than a third, and archiving it would free the room we need without buying anything. "
    "Finally, a reminder that the office will be closed on the last Friday of the month for "
    "the building inspection, so plan any work that needs the lab for the days before. If "
    "anything here is wrong or missing, reply to this note before Thursday and I will update "
    "it. Thanks, and see you at the meeting.",
]


class Sample(NamedTuple):
    kind: str  # "text" or "bfcl"
    name: str
    ids: list[int]
    split: int  # the prompt for greedy decoding ends here; the prefix cache is its whole pages


class Score(NamedTuple):
    greedy_same: int  # leading tokens identical to exact reuse's 64 greedy tokens
    greedy_match: float  # position-wise agreement of the 64 tokens
    kl_mean: float  # nats per position, KL(exact || codec), teacher-forced continuation
    kl_max: float
    nll: float  # mean negative log-likelihood of the continuation's tokens


def text_samples(tokenizer: Any) -> list[Sample]:
    out = []
    for i, passage in enumerate(PASSAGES):
        ids = list(tokenizer.encode(passage, add_special_tokens=False))
        out.append(Sample("text", f"passage {i}", ids, len(ids) - CONTINUATION))
    return out


def bfcl_samples(tokenizer: Any, count: int, max_prompt: int) -> list[Sample]:
    """Prompts of BFCL sessions cut mid-session: the prompt is one agent step, the continuation
    the conversation that follows it (assistant call, tool result, next user message...).
    ``count`` tasks spread evenly over those whose prompt fits in ``max_prompt`` tokens."""
    fitting: list[Sample] = []
    for task in bfcl.load_tasks():
        session = bfcl.task_session(task)
        if len(session.turns) < 3:
            continue
        middle = session.turns[len(session.turns) // 2]
        prompt = render(tokenizer, middle.messages, middle.tools)
        if len(prompt) > max_prompt:
            continue
        last = session.turns[-1]
        full = render(tokenizer, last.messages, last.tools, add_generation_prompt=False)
        if len(full) - len(prompt) < CONTINUATION or full[: len(prompt)] != prompt:
            continue  # too short a continuation, or the template closed the turn differently
        fitting.append(Sample("bfcl", task.task_id, full, len(prompt)))
    stride = max(1, len(fitting) // max(count, 1))
    return fitting[::stride][:count]


def score(engine: TransformersEngine, sample: Sample) -> dict[str, Score]:
    model = engine.model
    n = sample.split // PAGE * PAGE
    cont = sample.ids[n : n + CONTINUATION]
    exact = engine.prefill(sample.ids[:n])
    pages = engine.export_pages(exact.state, 0, n // PAGE, PAGE)  # [n/P, L, 2, H, P, D]
    layout = engine.layout.page_layout(PAGE, engine.dtype)
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    runs: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for name in CODECS:
        codec = get_codec(name)
        restored = codec.decode(codec.encode(pages), layout, torch.empty_like(pages))
        with torch.inference_mode():
            cache = kv_from_pages(restored, n, model.config, engine.device)
            ids = torch.tensor([cont], device=engine.device)  # [1, T]
            positions = torch.arange(n, n + len(cont), device=engine.device)[None]
            out = model(input_ids=ids, position_ids=positions, use_cache=True, **{kwarg: cache})
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # [T, vocab]
        pre = engine.prefill(sample.ids[: sample.split], KVPrefix(restored, n))
        greedy = [g.token_id for g in engine.decode(pre.state, GREEDY, stop_token_ids=())]
        runs[name] = (logp, greedy)
    ref_logp, ref_greedy = runs["none"]
    targets = torch.tensor(cont[1:])
    scores = {}
    for name, (logp, greedy) in runs.items():
        # KL(exact || codec) per position: sum_v p(v) (log p(v) - log q(v))
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)  # [T]
        nll = -logp[:-1].gather(1, targets[:, None]).mean()
        same = next(
            (i for i, (a, b) in enumerate(zip(greedy, ref_greedy, strict=True)) if a != b), GREEDY
        )
        match = sum(a == b for a, b in zip(greedy, ref_greedy, strict=True)) / GREEDY
        scores[name] = Score(same, match, float(kl.mean()), float(kl.max()), float(nll))
    return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bfcl", type=int, default=6, help="BFCL samples")
    p.add_argument("--max-prompt", type=int, default=4096, help="longest BFCL prompt (tokens)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    p.add_argument("--quick", action="store_true", help="2 text + 1 BFCL sample, no record")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared CPU: fewer threads spin less
    loaded = load_model("smollm2", dtype=args.dtype)
    engine = TransformersEngine(loaded)
    samples = text_samples(loaded.tokenizer)
    samples += bfcl_samples(loaded.tokenizer, 1 if args.quick else args.bfcl, args.max_prompt)
    if args.quick:
        samples = samples[:2] + samples[-1:]
    results: list[tuple[Sample, dict[str, Score]]] = []
    for s in samples:
        t0 = time.perf_counter()
        results.append((s, score(engine, s)))
        worst = results[-1][1]["int4"]
        print(f"{s.kind} {s.name}: {len(s.ids)} tokens, cache {s.split // PAGE * PAGE}, int4 "
              f"KL {worst.kl_mean:.4f}, greedy same {worst.greedy_same}/{GREEDY} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    layout = loaded.page_layout(PAGE)
    headers = [
        "codec", "data", "samples", "bytes/token", "vs none", "greedy 64/64 same",
        "tokens before divergence", "token agreement", "KL mean", "KL max", "ppl", "ppl change",
    ]  # fmt: skip
    rows: list[list[object]] = []
    for kind in ("text", "bfcl", "all"):
        group = [(s, sc) for s, sc in results if kind in ("all", s.kind)]
        if not group:
            continue
        ppl_ref = math.exp(statistics.fmean(sc["none"].nll for _, sc in group))
        for name in CODECS:
            scs = [sc[name] for _, sc in group]
            ppl = math.exp(statistics.fmean(x.nll for x in scs))
            per_token = get_codec(name).bytes_per_token(layout)
            rows.append([
                name, kind, len(scs), f"{per_token:,.0f}",
                f"{per_token / get_codec('none').bytes_per_token(layout):.3f}",
                f"{sum(x.greedy_same == GREEDY for x in scs)}/{len(scs)}",
                f"{statistics.fmean(x.greedy_same for x in scs):.1f}",
                f"{statistics.fmean(x.greedy_match for x in scs):.1%}",
                f"{statistics.fmean(x.kl_mean for x in scs):.2e}",
                f"{max(x.kl_max for x in scs):.2e}", f"{ppl:.3f}", f"{ppl / ppl_ref - 1:+.2%}",
            ])  # fmt: skip
    print_table(headers, rows)
    if args.quick:
        return 0
    dtype = str(loaded.dtype).removeprefix("torch.")
    tokens = sum(len(s.ids) for s in samples)
    body = (
        f"SmolLM2-135M-Instruct ({dtype} KV), page size {PAGE}, CPU. Samples: "
        f"{sum(s.kind == 'text' for s in samples)} natural-text passages (written for this "
        f"benchmark; the cache holds all but the last {CONTINUATION} tokens) and "
        f"{sum(s.kind == 'bfcl' for s in samples)} BFCL multi-turn prompts (tool schemas, user "
        "turns, ground-truth calls, synthesised results; cut at an agent step mid-session, the "
        f"continuation is the conversation that follows); {tokens:,} tokens in all. Per sample "
        "the prefix is prefilled exactly, its pages encoded and decoded with the codec, and the "
        "engine continues on the restored pages. *greedy*: the next 64 greedy tokens (no stop) "
        "against exact reuse (`none`); *KL*: KL(exact || codec) in nats of the next-token "
        f"distributions at the {CONTINUATION} teacher-forced continuation positions (mean over "
        "positions and samples; max over all); *ppl*: perplexity of the continuation tokens; "
        "*ppl change*: against `none`. Recommendation: docs/codecs.md.\n\n"
        + markdown_table(headers, rows)
    )
    record("codec quality (SmolLM2)", body, "python benchmarks/bench_codec_quality.py "
           + " ".join(sys.argv[1:]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
