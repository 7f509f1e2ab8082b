"""The GPT-2 model: shapes, initial loss, tying, init, presets."""

import math

import pytest
import torch

import train_improved as T


def tiny_config(**kw):
    return T.GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16), **kw})


def test_forward_shapes_and_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    model = T.GPT(tiny_config())
    idx, targets = torch.randint(0, 50257, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50304)
    assert abs(loss.item() - math.log(50304)) < 0.1  # small init: close to the uniform guess
    _, no_loss = model(idx)
    assert no_loss is None


def test_embeddings_are_tied_and_counted_once():
    model = T.GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # deduplicated


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    model = T.GPT(T.GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=16))
    scaled = model.transformer.h[0].attn.c_proj.weight.std().item()
    plain = model.transformer.h[0].attn.c_attn.weight.std().item()
    assert abs(plain - 0.02) < 0.002
    assert abs(scaled - 0.02 / math.sqrt(16)) < 0.001


def test_attention_is_causal():
    torch.manual_seed(0)
    model = T.GPT(tiny_config()).eval()
    a = torch.randint(0, 50257, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50257
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.equal(la[0, :10], lb[0, :10])  # changing the future never changes the past
    assert not torch.equal(la[0, 10:], lb[0, 10:])


def test_sequence_longer_than_block_size_is_rejected():
    model = T.GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("preset,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                          ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_gpt2_sizes(preset, count):
    with torch.device("meta"):  # no memory, no init cost
        model = T.GPT(T.TrainConfig(preset=preset).gpt_config())
    # the released GPT-2 checkpoints' parameter counts, with the 50257 vocabulary; ours pads it to 50304
    padded = (50304 - 50257) * model.config.n_embd
    assert model.num_parameters() - padded == count


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = T.GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, 50257, (2, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
