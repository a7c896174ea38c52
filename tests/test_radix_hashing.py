"""Page keys: same in every process, different whenever what may share KV differs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvruntime.errors import BadRequest
from kvruntime.kernels.layout import PageLayout
from kvruntime.radix import Namespace, encode_tokens, page_hashes, storage_key
from kvruntime.radix.hashing import decode_tokens

LAYOUT = PageLayout(num_layers=30, kv_heads=3, head_dim=64, page_size=4).describe()
NS = Namespace("smollm2-135m@q4_1", LAYOUT, "tenant-a")
TOKENS = [1, 70000, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2**32 - 1]  # 3 whole pages + 2

# Runs in a fresh interpreter with another PYTHONHASHSEED: prints the keys it computes.
CHILD = """
import json, sys
from kvruntime.radix import Namespace, page_hashes, storage_key
ns = Namespace(*json.loads(sys.argv[1]))
hashes = page_hashes(ns, json.loads(sys.argv[2]), 4)
print(json.dumps([ns.digest.hex(), [h.hex() for h in hashes],
                  [storage_key(h, "int8", exact=False) for h in hashes]]))
"""


def test_spec_blake2b_over_little_endian_uint32() -> None:
    # an independent rendering of the documented scheme, so the encoding cannot drift
    h = hashlib.blake2b(digest_size=16, person=b"kvr-ns-v1")
    for part in (NS.model.encode(), NS.layout.encode(), NS.tenant.encode(), NS.salt):
        h.update(len(part).to_bytes(8, "little") + part)
    assert NS.digest == h.digest()
    prev, expected = NS.digest, []
    for i in range(3):
        data = b"".join(t.to_bytes(4, "little") for t in TOKENS[4 * i : 4 * i + 4])
        prev = hashlib.blake2b(prev + data, digest_size=16, person=b"kvr-page-v1").digest()
        expected.append(prev)
    assert page_hashes(NS, TOKENS, 4) == expected


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_same_keys_in_another_process(seed: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            json.dumps([NS.model, NS.layout, NS.tenant]),
            json.dumps(TOKENS),
        ],
        env=env,
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    )
    digest, hashes, keys = json.loads(out.stdout)
    here = page_hashes(NS, TOKENS, 4)
    assert digest == NS.digest.hex()
    assert hashes == [h.hex() for h in here]
    assert keys == [storage_key(h, "int8", exact=False) for h in here]


def test_only_whole_pages_are_hashed() -> None:
    assert len(page_hashes(NS, TOKENS, 4)) == 3
    assert page_hashes(NS, TOKENS[:3], 4) == []
    assert page_hashes(NS, TOKENS[:12], 4) == page_hashes(NS, TOKENS, 4)


@pytest.mark.parametrize(
    "other",
    [
        Namespace("smollm2-360m@q4_1", LAYOUT, "tenant-a"),
        Namespace(NS.model, PageLayout(30, 3, 64, 4, torch.float16).describe(), "tenant-a"),
        Namespace(NS.model, LAYOUT, "tenant-b"),
        Namespace(NS.model, LAYOUT, "tenant-a", salt=b"user-7"),
    ],
    ids=["model", "layout", "tenant", "salt"],
)
def test_namespace_fields_separate_keys(other: Namespace) -> None:
    assert other.digest != NS.digest
    mine, theirs = page_hashes(NS, TOKENS, 4), page_hashes(other, TOKENS, 4)
    assert all(a != b for a, b in zip(mine, theirs, strict=True))


def test_field_boundaries_are_unambiguous() -> None:
    assert Namespace("ab", "c", "t").digest != Namespace("a", "bc", "t").digest
    assert Namespace("m", "l", "t1").digest != Namespace("m", "l", "t", salt=b"1").digest
    assert Namespace("m", "l", "t") == Namespace("m", "l", "t")


@pytest.mark.parametrize("page", [0, 1, 2])
def test_chain_changes_from_the_edited_page_on(page: int) -> None:
    edited = list(TOKENS)
    edited[4 * page + 2] += 1
    before, after = page_hashes(NS, TOKENS, 4), page_hashes(NS, edited, 4)
    assert before[:page] == after[:page], f"pages before {page} must keep their keys"
    assert all(a != b for a, b in zip(before[page:], after[page:], strict=True))


def test_chain_continues_from_a_parent_hash() -> None:
    full = page_hashes(NS, TOKENS, 4)
    assert page_hashes(NS, TOKENS[4:], 4, parent=full[0]) == full[1:]
    with pytest.raises(BadRequest, match="16-byte"):
        page_hashes(NS, TOKENS, 4, parent=b"short")


def test_storage_key_adds_codec_and_lineage() -> None:
    h = page_hashes(NS, TOKENS, 4)[0]
    keys = {
        storage_key(h, codec, exact=exact)
        for codec in ("none", "int8", "fp8", "int4")
        for exact in (True, False)
    }
    assert len(keys) == 8
    assert storage_key(h, "int8") == f"kvr:int8:exact:{h.hex()}"
    assert storage_key(h, "int8", exact=False, prefix="team1") == f"team1:int8:approx:{h.hex()}"
    with pytest.raises(BadRequest, match="codec"):
        storage_key(h, "int8:exact")
    with pytest.raises(BadRequest, match="page_hash"):
        storage_key(h[:8], "int8")


def test_token_containers_encode_alike() -> None:
    expected = encode_tokens(TOKENS)
    assert encode_tokens(tuple(TOKENS)) == expected
    assert encode_tokens(np.array(TOKENS, dtype=np.int64)) == expected
    assert encode_tokens(torch.tensor(TOKENS[:-1], dtype=torch.int64)) == expected[:-4]
    assert encode_tokens(iter(TOKENS)) == expected
    assert decode_tokens(expected) == TOKENS


@pytest.mark.parametrize(
    "bad", [[-1], [2**32], [1.5], "abc", np.zeros((2, 2), dtype=np.int64)], ids=str
)
def test_bad_tokens_are_refused(bad: object) -> None:
    with pytest.raises(BadRequest):
        encode_tokens(bad)


def test_namespace_checks_its_fields() -> None:
    with pytest.raises(BadRequest, match="non-empty"):
        Namespace("", LAYOUT, "t")
    with pytest.raises(BadRequest, match="salt"):
        Namespace("m", LAYOUT, "t", salt="text")
