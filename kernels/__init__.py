"""kvruntime.kernels: paged gather/scatter and fused page codecs (Triton + torch reference).

Importing this package needs no triton; the Triton kernels load on first use.
"""

from __future__ import annotations

from kvruntime.kernels.dispatch import (
    Rehydrate,
    backend_for,
    dequantize_pages,
    dequantize_scatter,
    gather_pages,
    gather_quantize,
    prepare_rehydrate,
    quantize_pages,
    rehydrate_pages,
    scatter_pages,
    token_view,
)
from kvruntime.kernels.layout import PageLayout
from kvruntime.kernels.quantized import (
    CODEC_NAMES,
    PageFormat,
    Part,
    QuantizedPages,
    page_format,
    pages_layout,
    pool_layout,
)

__all__ = [
    "CODEC_NAMES",
    "PageFormat",
    "PageLayout",
    "Part",
    "QuantizedPages",
    "Rehydrate",
    "backend_for",
    "dequantize_pages",
    "dequantize_scatter",
    "gather_pages",
    "gather_quantize",
    "page_format",
    "pages_layout",
    "pool_layout",
    "prepare_rehydrate",
    "quantize_pages",
    "rehydrate_pages",
    "scatter_pages",
    "token_view",
]
