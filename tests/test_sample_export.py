"""Using the model: src/sample.py from any checkpoint, and the Hugging Face export loaded by transformers."""

import json
import subprocess
import sys

import pytest
import torch

import train_improved as T
from helpers import ROOT, TINY_ARGS, built_once, run, trainer_env, write_bin_shard

PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A single-process run of 8 steps with evaluation, so best_model.pt and latest.pt both exist (read-only)."""
    def build(root):
        (root / "data").mkdir()
        write_bin_shard(root / "data" / "syn_val_000000.bin", start=0, count=4000)
        write_bin_shard(root / "data" / "syn_train_000001.bin", start=10_000, count=6000)
        result = run([*TINY_ARGS, "--data_dir", str(root / "data"), "--total_batch_size", "128", "--max_steps", "8",
                      "--eval_freq", "4", "--checkpoint_dir", str(root / "ck"), "--log_dir", str(root / "logs")],
                     nproc=None)
        assert result.returncode == 0, result.stdout[-3000:]
    return built_once(tmp_path_factory, "trained", build)


def cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *args], cwd=ROOT, env=trainer_env(),
                          capture_output=True, text=True, timeout=180)


def load_ours(path):
    state = T.CheckpointManager.load(path)
    model = T.GPT(T.GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def test_sample_cli_continues_the_prompt_reproducibly_from_the_checkpoint(trained):
    args = ["--checkpoint_dir", str(trained / "ck"), "--prompt", PROMPT, "--max_new_tokens", "8"]
    first = cli("sample.py", *args, "--checkpoint", "latest", "--num_samples", "2", "--seed", "3")
    assert first.returncode == 0, first.stderr
    samples = first.stdout.split("\n" + "-" * 80 + "\n")
    assert len(samples) == 2 and all(s.startswith(PROMPT) for s in samples)
    assert "latest.pt: step 8" in first.stderr
    again = cli("sample.py", *args, "--checkpoint", "latest", "--num_samples", "2", "--seed", "3")
    assert again.stdout == first.stdout  # same seed, same text
    assert cli("sample.py", *args, "--checkpoint", "latest", "--num_samples", "2", "--seed", "4").stdout != first.stdout

    # temperature 0 is the model's own greedy continuation: the CLI really uses that checkpoint's weights
    best = cli("sample.py", *args, "--temperature", "0")  # --checkpoint best is the default
    assert best.returncode == 0 and "best_model.pt: step" in best.stderr
    model, _ = load_ours(trained / "ck" / "best_model.pt")
    tok = T.load_gpt2_tokenizer()
    expected = T.generate(model, torch.tensor([tok.encode(PROMPT)]), 8, temperature=0, allowed_vocab=tok.n_vocab)
    assert best.stdout.rstrip("\n") == tok.decode(expected[0].tolist())


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nowhere.pt"], "error: --checkpoint nowhere.pt: nowhere.pt does not exist"),
    (["--checkpoint", "auto"], "error: --checkpoint auto is for resuming"),
    (["--temperature", "-1"], "--temperature and --top_k must be 0 or more"),
])
def test_sample_cli_bad_input_is_a_clear_error(trained, args, message):
    result = cli("sample.py", "--checkpoint_dir", str(trained / "ck"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_hugging_face_export_loads_in_transformers_with_the_same_logits_and_tokenizer(trained, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    out = tmp_path / "hf"
    result = cli("export_hf.py", "--checkpoint_dir", str(trained / "ck"), "--checkpoint", "best",
                 "--out_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "tokenizer_config.json", "vocab.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (2, 2, 32, 32)

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours, _ = load_ours(trained / "ck" / "best_model.pt")
    tokens = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        our_logits, _ = ours(tokens)
    assert hf_logits.shape == (3, 32, 50257)
    torch.testing.assert_close(hf_logits, our_logits[..., :50257], rtol=1e-5, atol=1e-5)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in ours

    text = "Hello world <|endoftext|> it's 2026!\n\n  Ünïcödé   spaces\tand tabs"
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == T.load_gpt2_tokenizer().encode(text, allowed_special="all")


def test_export_refuses_a_model_whose_vocabulary_is_not_gpt2s(tmp_path, trained):
    _, state = load_ours(trained / "ck" / "latest.pt")
    state = {**state, "model_config": {**state["model_config"], "vocab_size": 1000}}
    torch.save(state, tmp_path / "small_vocab.pt")
    result = cli("export_hf.py", "--checkpoint", str(tmp_path / "small_vocab.pt"), "--out_dir", str(tmp_path / "hf"))
    assert result.returncode == 2 and "only GPT-2-tokenized models can be exported" in result.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("script,extra", [("sample.py", []), ("export_hf.py", ["--out_dir", "OUT"])])
def test_the_tools_refuse_a_damaged_checkpoint_with_a_clear_error(trained, tmp_path, script, extra):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(trained / "ck", ck)
    best = ck / "best_model.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    best.write_bytes(bytes(data))
    result = cli(script, "--checkpoint_dir", str(ck), "--checkpoint", "best",
                 *[str(tmp_path / "hf") if a == "OUT" else a for a in extra])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint best:")
    assert "is not usable (checksum mismatch" in result.stderr and "try --checkpoint latest" in result.stderr
    assert not (tmp_path / "hf").exists()
