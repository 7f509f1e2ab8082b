"""Shared fixtures: offline tokenizer, synthetic shards, and real torchrun launches."""

import os
from pathlib import Path

import pytest

from helpers import write_bin_shard

SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN_CACHE)


@pytest.fixture
def shard_dir(tmp_path):
    """Two train shards and one val shard of consecutive integers: every window's content is known."""
    d = tmp_path / "data"
    d.mkdir()
    write_bin_shard(d / "syn_val_000000.bin", start=0, count=4000)
    write_bin_shard(d / "syn_train_000001.bin", start=10_000, count=6000)
    write_bin_shard(d / "syn_train_000002.bin", start=20_000, count=5000)
    return d
