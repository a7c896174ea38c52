"""Shared model fixtures: a tiny random-weight Llama (no download, fp32, fast) and the real
SmolLM2-135M-Instruct, each loaded once per test session.

Import the fixtures you use into a test file:
``from model_fixtures import tiny_engine as tiny_engine`` (the ``as`` form keeps ruff quiet).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvruntime.engines.models import LoadedModel, load_model
from kvruntime.engines.transformers import TransformersEngine

TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> object:
    """A character-level tokenizer (specials + printable ASCII + newline), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


def tiny_model(seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A random Llama: 3 layers, 2 KV heads of 16 dims, vocab 128, fp32. Weights are drawn
    with a large std so attention is sharp and depends on positions (tests can tell)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny(path: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_engine(tiny: LoadedModel) -> TransformersEngine:
    return TransformersEngine(tiny)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real model; the first load on a machine converts the GGUF (~25 s) into the cache."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2: LoadedModel) -> TransformersEngine:
    return TransformersEngine(smollm2)
