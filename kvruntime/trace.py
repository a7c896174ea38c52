"""Synthetic agent traces: seeded multi-session workloads shaped by public figures.

A trace is abstract: every message is a ``Block`` of seeded ``Chunk``\\ s with a nominal token
count, so one trace renders either to token ids (``TokenRenderer``, exact lengths, for models
without a tokenizer) or to chat messages and tool schemas (``TextRenderer``, for real models).
The same seed always gives the same trace, in every process.

Shape (defaults, from ANCHORS.md "Agent-aware systems" and DESIGN.md): all sessions share one
system prompt with tool schemas (2K-8K tokens); a session has 5-30 turns; each turn appends the
previous turn's tool call and its result (or an answer and a new user message), sized so that
85-95% of the prompt equals the previous prompt; tool waits are log-uniform from milliseconds to
tens of seconds; some turns break the prefix: an edited system prompt (``edit``) or a history
compacted into a summary when the prompt would outgrow ``max_prompt_tokens`` (``compact``).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import xxhash

from kvruntime.errors import ConfigError

MARK_TOKENS = 2  # a block's role marker and end marker (TokenRenderer; a chat template's cousins)
EVENTS = ("start", "tool", "user", "edit", "compact")
_PIECES = re.compile(r"\w+|[^\w\s]")


class Chunk(NamedTuple):
    seed: int
    tokens: int  # content tokens: exact for TokenRenderer, approximate for TextRenderer


class Block(NamedTuple):
    """One message. ``kind``: "text", "call" (an assistant tool call) or "result" (tool output);
    the system block also carries ``tools``, one chunk per tool schema."""

    role: str
    kind: str
    chunks: tuple[Chunk, ...]
    tools: tuple[Chunk, ...] = ()

    @property
    def tokens(self) -> int:
        return MARK_TOKENS + sum(c.tokens for c in self.chunks) + sum(c.tokens for c in self.tools)


class Turn(NamedTuple):
    blocks: tuple[Block, ...]  # the whole conversation sent this turn
    wait_s: float  # before sending: arrival (first turn) or the tool's run time
    max_tokens: int
    event: str  # one of EVENTS

    @property
    def tokens(self) -> int:
        """Prompt tokens as TokenRenderer renders them (blocks + the generation marker)."""
        return _prompt_tokens(self.blocks)


class SessionTrace(NamedTuple):
    session_id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class TraceConfig:
    seed: int = 0
    sessions: int = 32  # concurrent sessions (public deployments: 8-64)
    turns: tuple[int, int] = (5, 30)  # per session, uniform
    system_tokens: int = 4096  # shared system prompt, tool schemas included (2K-8K)
    tools: int = 16  # tool schemas within system_tokens
    task_tokens: tuple[int, int] = (64, 512)  # the user's first message
    call_tokens: tuple[int, int] = (24, 96)  # an assistant tool call
    overlap: tuple[float, float] = (0.85, 0.95)  # prompt share equal to the previous prompt
    tool_wait_s: tuple[float, float] = (0.002, 30.0)  # log-uniform
    arrival_s: float = 5.0  # sessions start uniformly within this window
    edit_prob: float = 0.05  # a turn whose system prompt was edited
    user_prob: float = 0.1  # a turn that answers and gets a new user message
    max_prompt_tokens: int = 32768  # beyond this the history is compacted
    output_tokens: int = 32  # max_tokens of every turn (agents: ~100:1 input to output)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"TraceConfig: {what}")

        need(self.sessions >= 1, f"sessions must be >= 1, got {self.sessions}")
        need(1 <= self.turns[0] <= self.turns[1], f"turns must be 1 <= lo <= hi, {self.turns}")
        need(self.tools >= 0, "tools must be >= 0")
        need(
            self.system_tokens >= 8 * (self.tools + 4),
            f"system_tokens {self.system_tokens} leaves < 8 tokens per tool and paragraph",
        )
        for name in ("task_tokens", "call_tokens"):
            lo, hi = getattr(self, name)
            need(1 <= lo <= hi, f"{name} must be 1 <= lo <= hi, got {(lo, hi)}")
        lo_o, hi_o = self.overlap
        need(0.5 <= lo_o <= hi_o < 1.0, f"overlap must be within [0.5, 1), got {self.overlap}")
        lo_w, hi_w = self.tool_wait_s
        need(0 < lo_w <= hi_w, f"tool_wait_s must be 0 < lo <= hi, got {self.tool_wait_s}")
        need(self.arrival_s >= 0, "arrival_s must be >= 0")
        need(0 <= self.edit_prob <= 1 and 0 <= self.user_prob <= 1, "probabilities in [0, 1]")
        need(self.output_tokens >= 1, "output_tokens must be >= 1")
        need(
            self.max_prompt_tokens >= 2 * (self.system_tokens + self.task_tokens[1]),
            "max_prompt_tokens must hold twice the system prompt and a task",
        )

    @classmethod
    def cpu(cls, seed: int = 0) -> TraceConfig:
        """8 sessions of 4-6 turns with ~1-2K-token prompts (chat-rendered): minutes with
        SmolLM2 on a CPU. Outputs of 8 tokens (~200:1 input to output; agents: ~100:1)."""
        small = cls(seed=seed, sessions=8, turns=(4, 6), tools=8, output_tokens=8)
        return small.scaled(0.2)

    def scaled(self, size: float) -> TraceConfig:
        """The same workload with every token length times ``size`` (ratios kept)."""
        if size <= 0:
            raise ConfigError(f"size must be positive, got {size}")

        def s(n: int) -> int:
            return max(1, round(n * size))

        return replace(
            self,
            system_tokens=s(self.system_tokens),
            task_tokens=(s(self.task_tokens[0]), s(self.task_tokens[1])),
            call_tokens=(s(self.call_tokens[0]), s(self.call_tokens[1])),
            max_prompt_tokens=s(self.max_prompt_tokens),
        )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sample_wait(rng: random.Random, lo: float, hi: float) -> float:
    """Log-uniform in [lo, hi]: as many waits per decade (ms file reads to 30 s test runs)."""
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def generate(config: TraceConfig) -> list[SessionTrace]:
    """The sessions of ``config``; deterministic for its seed (string-seeded RNGs)."""
    system = _system(random.Random(f"kvr-trace:{config.seed}:system"), config)
    return [
        _session(random.Random(f"kvr-trace:{config.seed}:session:{i}"), config, system, i)
        for i in range(config.sessions)
    ]


def _seed(rng: random.Random) -> int:
    return rng.getrandbits(62)


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """``parts`` positive integers summing to ``total`` (roughly equal, jittered)."""
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _system(rng: random.Random, c: TraceConfig) -> Block:
    paragraphs = 4
    content = c.system_tokens - MARK_TOKENS
    tool_share = content * c.tools // (c.tools + paragraphs) if c.tools else 0
    text = _split(rng, content - tool_share, paragraphs)
    tools = _split(rng, tool_share, c.tools) if c.tools else []
    return Block(
        "system",
        "text",
        tuple(Chunk(_seed(rng), n) for n in text),
        tuple(Chunk(_seed(rng), n) for n in tools),
    )


def _edit(rng: random.Random, system: Block) -> Block:
    """The system prompt with one paragraph or tool schema rewritten (same length)."""
    chunks, tools = list(system.chunks), list(system.tools)
    i = rng.randrange(len(chunks) + len(tools))
    if i < len(chunks):
        chunks[i] = Chunk(_seed(rng), chunks[i].tokens)
    else:
        tools[i - len(chunks)] = Chunk(_seed(rng), tools[i - len(chunks)].tokens)
    return system._replace(chunks=tuple(chunks), tools=tuple(tools))


def _block(rng: random.Random, role: str, kind: str, tokens: int) -> Block:
    return Block(role, kind, (Chunk(_seed(rng), max(1, tokens - MARK_TOKENS)),))


def _prompt_tokens(blocks: tuple[Block, ...]) -> int:
    return sum(b.tokens for b in blocks) + 1  # + the generation marker


def _growth(blocks: tuple[Block, ...], overlap: float) -> int:
    """Tokens to append so that the current prompt is ``overlap`` of the next one."""
    return max(2 * MARK_TOKENS + 2, round(_prompt_tokens(blocks) * (1 - overlap) / overlap))


def _session(rng: random.Random, c: TraceConfig, system: Block, index: int) -> SessionTrace:
    n_turns = rng.randint(*c.turns)
    task = _block(rng, "user", "text", rng.randint(*c.task_tokens))
    blocks: tuple[Block, ...] = (system, task)
    turns = [Turn(blocks, rng.uniform(0, c.arrival_s), c.output_tokens, "start")]
    for _ in range(1, n_turns):
        wait = sample_wait(rng, *c.tool_wait_s)
        event = "user" if rng.random() < c.user_prob else "tool"
        if rng.random() < c.edit_prob:
            event = "edit"
            blocks = (_edit(rng, blocks[0]), *blocks[1:])
        overlap = rng.uniform(*c.overlap)
        new = _growth(blocks, overlap)
        if _prompt_tokens(blocks) + new > c.max_prompt_tokens:
            event = "compact"  # the agent replaces its history with a summary
            summary = _block(rng, "user", "text", max(c.task_tokens[1], c.max_prompt_tokens // 8))
            blocks = (blocks[0], summary)
            new = _growth(blocks, overlap)
        call = min(rng.randint(*c.call_tokens), new // 2)
        if event == "user":
            reply = (
                _block(rng, "assistant", "text", call),
                _block(rng, "user", "text", new - call),
            )
        else:
            reply = (
                _block(rng, "assistant", "call", call),
                _block(rng, "tool", "result", new - call),
            )
        blocks = (*blocks, *reply)
        turns.append(Turn(blocks, wait, c.output_tokens, event))
    return SessionTrace(f"s{index:03d}", tuple(turns))


# ---------------------------------------------------------------------------- token ids


class TokenRenderer:
    """Token ids for a model without a tokenizer, vocabulary ``vocab_size``. A block renders
    as a role marker, its chunks' seeded ids and an end marker; ``chat`` renders OpenAI-shaped
    messages by hashing words. Ids below ``reserved`` are markers only (roles 3..6, end 7), so
    a random model's eos (keep it below ``reserved``) never appears in content."""

    ROLE_IDS: ClassVar[dict[str, int]] = {"system": 3, "user": 4, "assistant": 5, "tool": 6}
    END_ID = 7

    def __init__(self, vocab_size: int, reserved: int = 16) -> None:
        if not 8 <= reserved < vocab_size:
            raise ConfigError(f"need 8 <= reserved < vocab_size, got {reserved}, {vocab_size}")
        self.vocab_size = vocab_size
        self.reserved = reserved

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - renderers live as long as their trace
    def chunk(self, chunk: Chunk) -> tuple[int, ...]:
        rng = random.Random(chunk.seed)
        return tuple(rng.randrange(self.reserved, self.vocab_size) for _ in range(chunk.tokens))

    def block(self, block: Block) -> list[int]:
        out = [self.ROLE_IDS[block.role]]
        for c in (*block.chunks, *block.tools):
            out += self.chunk(c)
        out.append(self.END_ID)
        return out

    def prompt(self, turn: Turn) -> list[int]:
        out: list[int] = []
        for b in turn.blocks:
            out += self.block(b)
        out.append(self.ROLE_IDS["assistant"])  # the generation prompt
        return out

    def chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
    ) -> list[int]:
        """Chat messages -> ids with no tokenizer: each word or punctuation mark hashes
        (xxh64) to one id; tool schemas (JSON, keys sorted) close the first message, tool calls
        their assistant message. Deterministic in every process."""
        out: list[int] = []
        for i, m in enumerate(messages):
            parts = [str(m.get("content") or "")]
            if i == 0:
                parts += [json.dumps(t, sort_keys=True) for t in tools]
            parts += [json.dumps(c, sort_keys=True) for c in m.get("tool_calls") or ()]
            out.append(self.ROLE_IDS[str(m["role"])])
            out += self.words(" ".join(parts))
            out.append(self.END_ID)
        out.append(self.ROLE_IDS["assistant"])
        return out

    def words(self, text: str) -> list[int]:
        span = self.vocab_size - self.reserved
        return [
            self.reserved + xxhash.xxh64_intdigest(w.encode()) % span for w in _PIECES.findall(text)
        ]


# ---------------------------------------------------------------------------- chat messages


class ChatTurn(NamedTuple):
    messages: tuple[dict[str, Any], ...]  # OpenAI-shaped, the whole conversation
    tools: tuple[dict[str, Any], ...]  # function schemas
    wait_s: float
    max_tokens: int
    event: str


class ChatSession(NamedTuple):
    session_id: str
    turns: tuple[ChatTurn, ...]


_WORD_LIST = (
    "the agent file test tool call result error value list path read write search repository "
    "function module config request response user session cache token page prompt model data "
    "record field index query update check return parse build run step plan task issue fix "
    "change branch commit review docs table column row key string number date time status "
    "server client network memory disk process thread queue job retry limit budget report "
    "summary output input format schema option default name type object array boolean null "
    "when then before after because while unless only every each some many first last next "
    "must should may can will not with from into over under about between across against "
    "quickly carefully exactly safely again also still already always never often usually"
)
WORDS = tuple(_WORD_LIST.split())


class TextRenderer:
    """Blocks -> chat messages and tool schemas of about the blocks' token counts, written
    from a fixed word list. ``tokens_per_word`` converts counts to words; ``tool_overhead`` is
    what a schema costs besides its description (``fit`` measures both on a tokenizer)."""

    def __init__(self, tokens_per_word: float = 1.0, tool_overhead: int = 60) -> None:
        if tokens_per_word <= 0 or tool_overhead < 0:
            raise ConfigError(
                f"need tokens_per_word > 0 and tool_overhead >= 0, got {tokens_per_word}, "
                f"{tool_overhead}"
            )
        self.tokens_per_word = tokens_per_word
        self.tool_overhead = tool_overhead

    @classmethod
    def fit(cls, count_tokens: Callable[[str], int]) -> TextRenderer:
        """A renderer calibrated on a tokenizer: ``count_tokens(text) -> int``."""
        sample = cls().text(Chunk(12345, 2000))
        per_word = count_tokens(sample) / len(sample.split())
        tool = cls(per_word, 0).tool(Chunk(12345, 1))
        schema = count_tokens(json.dumps(tool, sort_keys=True))
        return cls(per_word, schema - count_tokens(tool["function"]["description"]))

    def text(self, chunk: Chunk) -> str:
        rng = random.Random(chunk.seed)
        n = max(1, round(chunk.tokens / self.tokens_per_word))
        words = [rng.choice(WORDS) for _ in range(n)]
        for i in range(11, n, 12):
            words[i] += "."  # sentences, so templates and tokenizers see prose
        return " ".join(words)

    def tool(self, chunk: Chunk) -> dict[str, Any]:
        rng = random.Random(chunk.seed)
        name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{chunk.seed % 1000}"
        params = {w: {"type": "string"} for w in rng.sample(WORDS, 2)}
        description = self.text(Chunk(chunk.seed ^ 1, max(1, chunk.tokens - self.tool_overhead)))
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {"type": "object", "properties": params, "required": list(params)},
            },
        }

    def message(self, block: Block) -> dict[str, Any]:
        body = " ".join(self.text(c) for c in block.chunks)
        if block.kind == "call":
            name = self.tool(Chunk(block.chunks[0].seed, 8))["function"]["name"]
            call = {"type": "function", "function": {"name": name, "arguments": {"query": body}}}
            return {"role": "assistant", "content": None, "tool_calls": [call]}
        return {"role": block.role, "content": body}

    def turn(self, turn: Turn) -> ChatTurn:
        system = turn.blocks[0]
        tools = tuple(self.tool(c) for c in system.tools)
        messages = tuple(self.message(b) for b in turn.blocks)
        return ChatTurn(messages, tools, turn.wait_s, turn.max_tokens, turn.event)

    def sessions(self, trace: list[SessionTrace]) -> list[ChatSession]:
        return [ChatSession(s.session_id, tuple(self.turn(t) for t in s.turns)) for s in trace]
