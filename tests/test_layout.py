from __future__ import annotations

import pytest
import torch

from kvruntime.errors import ConfigError
from kvruntime.kernels.layout import PageLayout


def test_llama8b_page_bytes() -> None:
    layout = PageLayout(num_layers=32, kv_heads=8, head_dim=128, page_size=16)
    assert layout.bytes_per_token == 128 * 1024
    assert layout.page_shape == (32, 2, 8, 16, 128)
    assert layout.pool_shape(4) == (32, 2, 4, 8, 16, 128)


def test_bad_layout_is_refused() -> None:
    with pytest.raises(ConfigError, match="page_size"):
        PageLayout(num_layers=2, kv_heads=1, head_dim=8, page_size=0)
    with pytest.raises(ConfigError, match="unsupported KV dtype"):
        PageLayout(num_layers=2, kv_heads=1, head_dim=8, page_size=4, dtype=torch.int8)
