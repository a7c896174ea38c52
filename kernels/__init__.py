"""kvruntime.kernels: paged gather/scatter and fused page codecs (Triton + torch reference).

Importing this package needs no triton; the Triton kernels load on first use.
"""

from __future__ import annotations

from kvruntime.kernels.dispatch import (
    backend_for,
    dequantize_pages,
    dequantize_scatter,
    gather_pages,
    gather_quantize,
    quantize_pages,
    scatter_pages,
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
    "backend_for",
    "dequantize_pages",
    "dequantize_scatter",
    "gather_pages",
    "gather_quantize",
    "page_format",
    "pages_layout",
    "pool_layout",
    "quantize_pages",
    "scatter_pages",
]
