"""Model loading: aliases, local paths, dtype, the GGUF conversion cache, the fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import save_tiny, tiny_model, tiny_tokenizer
from model_fixtures import smollm2 as smollm2  # fixtures
from model_fixtures import tiny as tiny
from model_fixtures import tiny_dir as tiny_dir

from kvruntime.engines.base import KVPrefix
from kvruntime.engines.models import (
    MARKER,
    MODELS,
    GGUFModel,
    LoadedModel,
    convert_gguf,
    load_model,
    model_fingerprint,
    write_atomically,
)
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.errors import ConfigError, UnknownName


def test_smollm2_alias_loads_the_real_model(smollm2: LoadedModel) -> None:
    assert "smollm2" in MODELS
    assert smollm2.layout == (30, 3, 64)
    assert smollm2.dtype == torch.float32  # GGUF dequantizes to fp32; we keep it
    assert smollm2.max_context == 8192
    assert smollm2.page_layout(16).describe() == "L30-H3-D64-P16-float32"
    assert len(smollm2.fingerprint) == 32 and int(smollm2.fingerprint, 16) >= 0
    assert (smollm2.source_dir / MARKER).is_file()
    assert json.loads((smollm2.source_dir / MARKER).read_text())["source"].endswith(".gguf")
    assert "<|im_start|>" in smollm2.tokenizer.chat_template
    # The fingerprint is a function of what was loaded: recomputing it agrees.
    assert model_fingerprint(smollm2.model) == smollm2.fingerprint


def test_converted_copy_is_reused_without_converting(smollm2: LoadedModel) -> None:
    spec = MODELS.get("smollm2")
    stages: list[str] = []
    again = convert_gguf(spec.locate(), spec.name, smollm2.source_dir.parent, stages.append)
    assert again == smollm2.source_dir
    assert stages == []


def test_unknown_names_never_download(tmp_path: Path) -> None:
    with pytest.raises(UnknownName, match=r"known: smollm2.*never downloads"):
        load_model("no-such-org/no-such-model-kvr")
    with pytest.raises(UnknownName, match=r"no config\.json"):
        load_model(str(tmp_path))  # an empty directory holds no model
    missing = GGUFModel("X", "kvr_no_such_package", "x.gguf", "pip install kvr-no-such")
    with pytest.raises(ConfigError, match="pip install kvr-no-such"):
        missing.locate()


def test_local_directory_and_dtype(tiny_dir: Path, tiny: LoadedModel) -> None:
    assert tiny.name == tiny_dir.name and tiny.source_dir == tiny_dir
    assert tiny.layout == (3, 2, 16) and tiny.dtype == torch.float32
    half = load_model(str(tiny_dir), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.page_layout(8).dtype == torch.bfloat16
    assert half.fingerprint != tiny.fingerprint  # a different dtype never shares KV
    with pytest.raises(ConfigError, match="supported"):
        load_model(str(tiny_dir), dtype="int8")


def test_fingerprint_follows_weights_and_config(tiny: LoadedModel) -> None:
    # Built in memory from the same config and seed: same fingerprint as the saved-and-loaded copy
    # (paths, versions and output flags are not part of it).
    assert model_fingerprint(tiny_model(seed=0)) == tiny.fingerprint
    assert model_fingerprint(tiny_model(seed=1)) != tiny.fingerprint
    changed = tiny_model(seed=0)
    changed.config.rms_norm_eps = 1e-5
    assert model_fingerprint(changed) != tiny.fingerprint
    nudged = tiny_model(seed=0)
    with torch.no_grad():
        nudged.model.norm.weight[3] += 1e-6
    assert model_fingerprint(nudged) != tiny.fingerprint


def test_fingerprint_is_stable_across_processes(tiny_dir: Path, tiny: LoadedModel) -> None:
    code = (
        "import sys; from kvruntime.engines.models import load_model as m;"
        " print(m(sys.argv[1]).fingerprint)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == tiny.fingerprint


def test_other_llama_family_models_load_and_reuse_kv(tmp_path: Path) -> None:
    from transformers import MistralConfig, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.3,
    }
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(tmp_path / "qwen2")
    tiny_tokenizer().save_pretrained(tmp_path / "qwen2")  # type: ignore[attr-defined]
    engine = TransformersEngine(load_model(str(tmp_path / "qwen2")))
    tokens = list(range(5, 45))
    state = engine.prefill(tokens[:24]).state
    past = KVPrefix(engine.export_pages(state, 0, 3, 8), 24)
    assert torch.allclose(
        engine.prefill(tokens, past).logits, engine.prefill(tokens).logits, atol=1e-5
    )

    from transformers import MistralForCausalLM

    MistralForCausalLM(MistralConfig(**shape, sliding_window=8)).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="DynamicSlidingWindowLayer"):
        load_model(str(tmp_path / "m"))


def test_write_atomically_never_leaves_a_partial_copy(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m-1"

    def broken(tmp: Path) -> None:
        (tmp / "weights").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomically(target, broken)
    assert list(target.parent.iterdir()) == []

    # A load killed outright leaves its temporary directory; the next writer removes it.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = target.parent / f".tmp-{target.name}-{int(dead.stdout)}-abcd1234"
    stale.mkdir()
    live = target.parent / f".tmp-{target.name}-{os.getpid()}-live0000"  # a concurrent writer
    live.mkdir()

    def good(tmp: Path) -> None:
        (tmp / "weights").write_bytes(b"full")
        (tmp / MARKER).write_text("{}")

    write_atomically(target, good)
    assert (target / "weights").read_bytes() == b"full"
    assert not stale.exists() and live.exists()

    # Losing a race keeps the winner's complete copy.
    def other(tmp: Path) -> None:
        (tmp / "weights").write_bytes(b"late")

    write_atomically(target, other)
    assert (target / "weights").read_bytes() == b"full"
    assert sorted(p.name for p in target.parent.iterdir()) == [live.name, target.name]


def test_saved_tiny_model_round_trips(tmp_path: Path) -> None:
    again = load_model(str(save_tiny(tmp_path / "copy", seed=5)))
    assert again.fingerprint == model_fingerprint(tiny_model(seed=5))
