"""src/prepare_data.py on small inputs of every supported type, offline through TIKTOKEN_CACHE_DIR."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

import prepare_data as P
import train_improved as T
from helpers import ROOT

ENC = tiktoken.get_encoding("gpt2")


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


def test_offline_without_tokenizer_cache_explains_tiktoken_cache_dir(tmp_path):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    # an unreachable proxy makes the download fail fast, like an air-gapped machine
    result = run_cli(["--out_dir", str(tmp_path / "o")], {"TIKTOKEN_CACHE_DIR": str(empty),
                                                          "HTTPS_PROXY": "http://127.0.0.1:9",
                                                          "HTTP_PROXY": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "TIKTOKEN_CACHE_DIR" in result.stderr
    assert "Traceback" not in result.stderr


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
