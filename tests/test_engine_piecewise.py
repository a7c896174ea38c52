"""The piecewise forward (engines/piecewise.py) computes what transformers' forward computes:
bit for bit on the CPU (same modules, same order), within bf16 rounding from CUDA graphs with
padded rows; and it refuses models that are not of the shape it assumes."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import smollm2 as smollm2  # fixtures
from model_fixtures import tiny as tiny
from model_fixtures import tiny_dir as tiny_dir
from model_fixtures import tiny_model

from kvruntime.engines.attention import use_fast_causal
from kvruntime.engines.base import KVPrefix
from kvruntime.engines.models import LoadedModel
from kvruntime.engines.piecewise import BUCKETS, PiecewiseForward, unsupported
from kvruntime.engines.transformers import EngineConfig, TransformersEngine, kv_from_pages
from kvruntime.errors import ConfigError

P = 16


def prompt(n: int, seed: int = 3, vocab: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


def test_llama_with_fast_attention_is_supported_and_others_say_why() -> None:
    model = tiny_model()
    assert unsupported(model) is not None  # stock sdpa: the engine has not switched it yet
    assert "attention is 'sdpa'" in str(unsupported(model))
    use_fast_causal(model)
    assert unsupported(model) is None

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    assert "model type 'gpt2'" in str(unsupported(gpt2))
    with pytest.raises(ConfigError, match="cannot run piecewise"):
        PiecewiseForward(gpt2, torch.device("cpu"))


def test_engine_runs_piecewise_unless_turned_off(tiny: LoadedModel) -> None:
    assert TransformersEngine(tiny).piecewise is not None
    assert TransformersEngine(tiny, EngineConfig(piecewise_forward=False)).piecewise is None
    with pytest.raises(ConfigError, match="graph_tokens"):
        EngineConfig(graph_tokens=-1)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_same_logits_and_tokens_as_transformers_forward(
    which: str, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    fast = TransformersEngine(loaded, EngineConfig(prefill_chunk_tokens=48))
    stock = TransformersEngine(
        loaded, EngineConfig(prefill_chunk_tokens=48, piecewise_forward=False)
    )
    assert fast.piecewise is not None and stock.piecewise is None
    tokens = prompt(130)
    cold = [e.prefill(tokens) for e in (fast, stock)]  # three chunks: 48, 48, 34
    assert torch.equal(cold[0].logits, cold[1].logits)
    pages = stock.export_pages(cold[1].state, 0, 5, P)  # the first 80 tokens
    warm = [e.prefill(tokens, KVPrefix(pages, 80)) for e in (fast, stock)]
    assert warm[0].cached_tokens == 80
    assert torch.equal(warm[0].logits, warm[1].logits)
    outs = [[t.token_id for t in e.decode(r.state, 6, stop_token_ids=())] for e, r in
            zip((fast, stock), warm, strict=True)]  # fmt: skip
    assert outs[0] == outs[1]
    # and the KV each leaves behind is the same
    assert torch.equal(
        fast.export_pages(warm[0].state, 0, 8, P), stock.export_pages(warm[1].state, 0, 8, P)
    )


def test_wrong_positions_would_show(tiny: LoadedModel) -> None:
    """Guards the equality above: the suffix's offset from its cached prefix matters (a whole
    prompt shifted by a constant would not show, RoPE being relative)."""
    engine = TransformersEngine(tiny)
    assert engine.piecewise is not None
    tokens = prompt(30)
    got = []
    with torch.inference_mode():
        for offset in (20, 23):
            cache = kv_from_pages(None, 0, engine.model.config, "cpu")
            engine.piecewise.forward(cache, tokens[:20], 0)
            got.append(engine.piecewise.forward(cache, tokens[20:], offset))
    assert not torch.allclose(got[0], got[1], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_buckets_match_eager_pieces_and_transformers() -> None:
    """Padded buckets replayed from graphs give the logits and KV of an eager forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, vocab_size=512, dtype="bfloat16",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    use_fast_causal(model)
    dev = torch.device("cuda")
    graphed, eager = PiecewiseForward(model, dev, 512), PiecewiseForward(model, dev, 0)
    tokens = prompt(700, vocab=512)
    caches = [kv_from_pages(None, 0, model.config, dev) for _ in range(3)]
    with torch.inference_mode():
        for lo, hi in ((0, 300), (300, 303), (303, 304), (304, 700)):
            chunk = tokens[lo:hi]
            a = graphed.forward(caches[0], chunk, lo)
            b = eager.forward(caches[1], chunk, lo)
            ids = torch.tensor([chunk], device=dev)
            pos = torch.arange(lo, hi, device=dev).unsqueeze(0)
            c = model(input_ids=ids, position_ids=pos, past_key_values=caches[2],
                      use_cache=True, logits_to_keep=1).logits[0, -1].float()  # fmt: skip
            assert torch.allclose(a, b, atol=0.05, rtol=0.02), (lo, hi, (a - b).abs().max())
            assert torch.allclose(a, c, atol=0.05, rtol=0.02), (lo, hi, (a - c).abs().max())
            assert int(a.argmax()) == int(c.argmax())
    assert graphed.captured_buckets == (1, 16, 512)  # 300 -> 512, 3 -> 16, 1 -> 1; 396 -> 512
    assert eager.captured_buckets == ()
    for layer in range(4):
        k0, k2 = caches[0].layers[layer].keys, caches[2].layers[layer].keys
        assert k0.shape == k2.shape == (1, 2, 700, 32)
        assert (k0.float() - k2.float()).abs().max() < 0.05
    assert set(BUCKETS) >= {1, 16, 512}
    assert PiecewiseForward(model, dev, 300).capture_all() == (1, 16, 64, 128, 256)
