"""FP8 training (--fp8): the transformer blocks' matmuls in float8, on torchao's float8 training.

The trainer imports this module only when --fp8 is given, and calls it through one narrow seam:

    fp8.check_hardware(env.device, emulate)           # at start: one-line FP8Error if this machine cannot do it
    fp8.outlook(capability, n_embd, recipe)           # at start: a warning when float8 is expected not to pay
    names = fp8.convert(raw_model, recipe, emulate)   # right after GPT(...).to(device); before the optimizer,
                                                      # the checkpoint restore, torch.compile and DDP

What changes: c_attn, c_proj and c_fc of every block become torchao Float8Linear layers. Each of their matmuls
(forward, grad_input, grad_weight) casts its two operands to float8 with scales computed from those very tensors
at that moment (dynamic scaling), multiplies in float8 and returns high precision. What does not change: the
weights, their gradients and the AdamW state stay fp32; the embeddings, the tied lm_head, the LayerNorms and the
attention stay as they were; and the checkpoint is the same file, with the same keys, shapes and dtypes, so an
fp8 run resumes a bf16 checkpoint and the other way round.

Needs torchao (requirements-fp8.txt; `pip install --no-deps torchao==0.18.0`, tested with torch 2.13.0) and, for
real float8 matmuls, an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell). `emulate=True` runs the
same code path with the float8 matmuls emulated in fp32 (float8-rounded operands), on any device: for tests.
Speed needs --compile: eager mode runs every scale and cast as kernels of their own, and torchao's float8 without
torch.compile has been measured slower than bf16 (pytorch/ao#685). Small widths gain little: torchao's own size
heuristic (_auto_filter_for_recipe) would leave both c_proj layers of GPT-2 124M (768 outputs) in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re

import torch
from torch import nn

TORCHAO_PIN = "torchao==0.18.0"
PIP_INSTALL = f"pip install --no-deps {TORCHAO_PIN}"  # --no-deps: never let pip swap the pinned torch
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
# torchao's float8 training recipes offered here. MXFP8 (Blackwell's block-scaled float8) is not offered: in
# torchao 0.18 it is a prototype behind another API (quantize_ with prototype.moe_training.MXFP8TrainingOpConfig)
# that replaces each weight Parameter by a tensor subclass, so the state_dict holds subclass tensors that
# torch.load(weights_only=True) refuses and the optimizer must be rebuilt; its emulated mode fails under bf16
# autocast on CPU, and its real kernels need sm100 with CUDA 12.8+ and a compiled extension (_C_mxfp8) built
# for one torch release, which nothing here can check. tensorwise and rowwise run on Blackwell as they are.
RECIPES = ("tensorwise", "rowwise")
# The blocks' Linear layers, by their GPT-2 names. Not the lm_head: it shares its weight with wte, an
# nn.Embedding, so a float8 lm_head would quantize the embedding table's gradient path and the logits, the
# numbers the loss is most sensitive to; torchtitan also keeps the output layer in high precision. Embeddings
# are not matmuls and are never converted.
BLOCK_LINEAR = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")


# What --fp8 --compile (tensorwise) measured against bf16 --compile, as tokens/s ratios, by compute capability and
# model width (n_embd): benchmarks/gpu_check.sh item 6 on one H200 (torch 2.11, CUDA 13, torchao 0.18.0) at commit
# 99c98cd. Nothing else has been measured yet: other widths, rowwise, other GPUs are "not measured".
MEASURED_SPEEDUP = {
    (9, 0): {768: (0.89, "GPT-2 124M, 16 x 1024 tokens a micro-step"), 1600: (0.93, "gpt2-xl, 4 x 1024")},
}


def outlook(capability: tuple[int, int], n_embd: int, recipe: str) -> str | None:
    """A warning for the start of an --fp8 run when float8 is expected to be slower than bf16 for this width on
    this GPU (from MEASURED_SPEEDUP), or to say that nothing was measured here; None when a measurement says it
    pays."""
    measured = MEASURED_SPEEDUP.get(tuple(capability), {})
    if recipe == "tensorwise" and measured:
        widest = max(measured)
        if n_embd <= widest and all(ratio < 1 for ratio, _ in measured.values()):
            figures = ", ".join(f"{ratio:.2f}x at n_embd {width} ({what})" for width, (ratio, what) in
                                sorted(measured.items()))
            return (f"--fp8 is expected to be SLOWER than bf16 here: on this GPU generation (compute capability "
                    f"{capability[0]}.{capability[1]}) it measured {figures} with --compile, and this model is "
                    f"n_embd {n_embd}. The matmuls of GPT-2 sizes are too small for float8 to pay for its casts; "
                    "drop --fp8 unless you measured otherwise (benchmarks/gpu_check.sh item 6)")
        if all(ratio >= 1 for ratio, _ in measured.values()):
            return None
    blackwell = capability[0] >= 10
    return (f"--fp8 {recipe}: its speed against bf16 was not measured on a GPU of compute capability "
            f"{capability[0]}.{capability[1]} at n_embd {n_embd}; measure it with benchmarks/gpu_check.sh before a "
            "long run" + ("" if not blackwell else ". On Blackwell, block-scaled MXFP8 (which its tensor cores run "
                          "natively) is what should pay; this script offers tensorwise and rowwise only (see "
                          "src/fp8.py)"))


class FP8Error(Exception):
    """One-line, user-facing: the trainer turns it into exit 2."""


@contextlib.contextmanager
def _quiet_import():
    """Silence two import-time warnings that say nothing about float8 training: torchao's attempt to load its
    compiled CUDA extensions (the MXFP8 and CUTLASS kernels; float8 training goes through torch._scaled_mm, and on a
    CPU-only torch the extensions cannot load at all) and torch's deprecation notice about how torchao registers
    its enums with pytree."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _float8():
    """torchao.float8, imported on first use (torchao is optional); FP8Error with the pip command if it fails."""
    try:
        with _quiet_import():
            import torchao.float8 as float8
    except Exception as e:  # not installed, or installed against an incompatible torch
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FP8Error(f"--fp8 needs torchao, which could not be imported ({detail}); install it with: "
                       f"{PIP_INSTALL} (or use --no-fp8)") from None
    return float8


def check_hardware(device: torch.device, emulate: bool) -> None:
    """Raise FP8Error unless this run can train in float8: torchao importable, and a CUDA device of compute
    capability 8.9+ (Ada, Hopper, Blackwell), unless emulate, which runs anywhere."""
    _float8()
    if emulate:
        return
    need = "float8 matmuls need an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell)"
    if device.type != "cuda" or not torch.cuda.is_available():
        raise FP8Error(f"--fp8: {need}, and this run has no CUDA GPU (device {device}); use --no-fp8, "
                       "or --fp8_emulate for tests")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise FP8Error(f"--fp8: {need}; {torch.cuda.get_device_name(device)} has compute capability "
                       f"{capability[0]}.{capability[1]}; use --no-fp8 (bf16), or --fp8_emulate for tests")


def convert(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False) -> list[str]:
    """Convert the blocks' nn.Linear layers (c_attn, c_proj, c_fc) of `model`, a GPT, in place to float8
    training with torchao's recipe ("tensorwise": one dynamic scale per tensor, the fastest; "rowwise": one per row,
    scales rounded to powers of two, more accurate), emulated in fp32 if emulate. Returns the converted names.

    The Parameters stay the same objects (torchao's Float8Linear takes over nn.Linear's weight and bias), so
    weight tying, the state_dict and an optimizer built before or after all see the same tensors; build the
    optimizer after converting anyway, and convert before torch.compile and DDP wrap the model. Real float8 matmuls
    (torch._scaled_mm) need the layer widths to be multiples of 16 (checked here) and, in the backward pass, the
    tokens of a micro-batch (batch_size x block_size) too; a second call converts nothing."""
    if recipe not in RECIPES:
        raise FP8Error(f"--fp8_recipe {recipe!r} is not one of: {', '.join(RECIPES)}")
    float8 = _float8()
    selected = [name for name, module in model.named_modules()
                if type(module) is nn.Linear and BLOCK_LINEAR.fullmatch(name)]
    if not emulate:
        for name in selected:
            linear = model.get_submodule(name)
            if linear.in_features % 16 or linear.out_features % 16:
                raise FP8Error(f"--fp8: {name} is {linear.in_features} x {linear.out_features}, but float8 "
                               "matmuls need both sizes to be multiples of 16; choose n_embd as a multiple of 16 "
                               "or use --no-fp8")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    wanted = set(selected)
    float8.convert_to_float8_training(model, module_filter_fn=lambda module, name: name in wanted, config=config)
    return selected


def state_outside_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float8 scaling state torchao keeps outside the weights, as plain tensors to save beside them: with
    torchao 0.18's dynamic scaling (tensorwise and rowwise), none, so this returns {}.

    How that was checked: in torchao 0.18 a Float8Linear registers no buffers and no extra state (its state_dict
    has exactly nn.Linear's keys; tests/test_fp8.py compares whole state_dicts), and its other attributes are
    configuration (a frozen Float8LinearConfig, a NamedTuple of flags, enums), none of them tensors. Every scale is
    computed from the tensor being cast, inside the matmul (torchao/float8/float8_scaling_utils.py,
    hp_tensor_to_float8_dynamic), and ScalingType has only DYNAMIC and DISABLED: the delayed and static scaling of
    older releases, with their amax-history and scale buffers, were removed. This function still looks for such
    state (non-persistent buffers and tensor attributes of torchao's modules), so a torchao upgrade that brings
    some back makes it non-empty, and tests/test_fp8.py fails instead of resumes silently losing it."""
    found = {}
    for module_name, module in model.named_modules():
        if not type(module).__module__.startswith("torchao"):
            continue
        for attr in module._non_persistent_buffers_set:
            found[f"{module_name}.{attr}"] = module._buffers[attr].detach().clone()
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found[f"{module_name}.{attr}"] = value.detach().clone()
    return found


def load_state_outside_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back what state_outside_weights returned (nothing with torchao 0.18), in place."""
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        target = getattr(model.get_submodule(module_name), attr)
        with torch.no_grad():
            target.copy_(value)
