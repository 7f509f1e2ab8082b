"""Generate text from a checkpoint of train_improved.py, on CPU or GPU.

  python src/sample.py                                        # checkpoints/best_model.pt, default prompt
  python src/sample.py --checkpoint latest --prompt "The meaning of life is" --max_new_tokens 200
  python src/sample.py --checkpoint checkpoints/rolling_step_001000.pt --temperature 0.8 --top_k 200 --num_samples 3

The checkpoint is loaded with torch.load(weights_only=True) after its checksums are verified, and the model is built
from the shape stored in it. Decoding uses tiktoken's GPT-2 encoding, built offline (src/gpt2_tokenizer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import train_improved as T


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of sample.py, checked."""
    parser = argparse.ArgumentParser(prog="sample.py", description="Generate text from a train_improved.py checkpoint.")
    parser.add_argument("--checkpoint", default="best",
                        help="best | latest | latest_backup | PATH (default: best, i.e. best_model.pt)")
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where best/latest are looked for")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: always the most "
                        "likely token)")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--num_samples", type=int, default=1, help="how many samples to print")
    parser.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same samples")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.temperature < 0 or args.top_k < 0:
        parser.error("--temperature and --top_k must be 0 or more")
    return args


def load_model(spec: str, checkpoint_dir: str, device: torch.device) -> tuple[T.GPT, Path, dict]:
    """The model of checkpoint `spec` (best, latest, latest_backup or a path), verified, in eval mode."""
    path, state = T.load_named(checkpoint_dir, spec)
    model = T.GPT(T.GPTConfig(**{**state["model_config"], "dropout": 0.0}))
    model.load_state_dict(state["model"])
    info = dict(step=state["step"], val_loss=state["val_loss"], train_loss=state["train_loss"])
    return model.to(device).eval(), path, info


def main(argv: list[str] | None = None) -> list[str]:
    """Print and return the samples."""
    args = parse_args(argv)
    try:
        use_cuda = T.wants_cuda(args.device)
        device = torch.device("cuda" if use_cuda else "cpu")
        model, path, info = load_model(args.checkpoint, args.checkpoint_dir, device)
        try:
            tokenizer = T.load_gpt2_tokenizer()
        except Exception as e:
            raise T.UserError(f"the GPT-2 tokenizer did not load ({type(e).__name__}: {e})") from None
    except T.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"# {path}: step {info['step']}, train loss {T.fmt_loss(info['train_loss'])}, "
          f"val loss {T.fmt_loss(info['val_loss'])}", file=sys.stderr)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()

    samples = T.sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.seed, autocast,
                            temperature=args.temperature, top_k=args.top_k or None, num_samples=args.num_samples)
    for i, text in enumerate(samples):
        if i:
            print("-" * 80)
        print(text)
    return samples


if __name__ == "__main__":
    main()
