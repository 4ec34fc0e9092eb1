"""Model FLOPs utilisation of a training run: the FLOPs a training step computes per token, and the machine's
matmul peak they are measured against.

What is counted, per token (a multiply-add is 2 FLOPs):
- forward: every linear layer of the model (the base's, the LM head, LoRA's A and B): 2 x in x out;
- backward, input gradients: 2 x in x out for each linear layer whose input needs a gradient (the first layer's
  projections of the frozen embeddings need none, and autograd computes none);
- backward, weight gradients: 2 x in x out for each trainable linear layer (with LoRA: its A and B only);
- attention: per layer 4 x T x heads x head_dim forward (scores and the weighted sum over T positions, the whole
  T x T square, as the kernels compute it), and backward 2 x T x heads x head_dim for each gradient autograd
  computes: of the queries, the keys, the attention weights (when the queries or keys need one) and the values.
  With LoRA on some projections only (PEFT's q_proj and v_proj), the first layer's keys need none; T = the mean
  length of the run's sequences.
Not counted: embeddings (lookups), norms, activations, softmax, the loss, the optimizer. The count is checked
against torch's FlopCounterMode on real rows (tests/test_training.py; attention through the eager path, since
FlopCounterMode has no formula for the CPU's fused attention kernel).
"""

from __future__ import annotations

import time
from typing import Any


def linear_layers(model: Any, example: Any) -> list[tuple[int, int, bool, bool]]:
    """(in, out, trainable weight, input needs a gradient) for every linear layer one forward pass runs, seen by
    running `example` (input ids, 1 x n) through `model` in eval mode (no dropout, no randomness drawn)."""
    import torch

    seen: list[tuple[int, int, bool, bool]] = []

    def hook(module: Any, inputs: tuple[Any, ...], _out: Any) -> None:
        seen.append((module.in_features, module.out_features, module.weight.requires_grad, inputs[0].requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    _run_hooked(model, example, handles)
    return seen


def _run_hooked(model: Any, example: Any, handles: list[Any]) -> None:
    """Run `example` through `model` in eval mode with gradients on (so `requires_grad` is as in training), then
    remove the forward hooks `handles`."""
    import torch

    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(input_ids=example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


# the projections whose outputs are a layer's queries, keys and values: separate, or one fused layer for all three
PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "query_key_value": "qkv", "qkv_proj": "qkv"}


def attention_grads(model: Any, example: Any) -> list[tuple[bool, bool, bool]]:
    """For each layer, in order, whether its queries, keys and values need a gradient (their projection's output
    does), seen by running `example` through `model` as `linear_layers` does. Empty for a model whose projections
    are named otherwise (then every gradient is counted)."""

    seen: list[dict[str, bool]] = []

    def hook(name: str) -> Any:
        def record(_module: Any, _inputs: Any, out: Any) -> None:
            if not seen or any(k in seen[-1] for k in name):
                seen.append({})
            seen[-1].update(dict.fromkeys(name, bool(out.requires_grad)))

        return record

    handles = [  # the projection as the layer calls it: a LoRA wrapper, or the plain Linear
        m.register_forward_hook(hook(PROJECTIONS[n.rsplit(".", 1)[-1]]))
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in PROJECTIONS
    ]
    _run_hooked(model, example, handles)
    if len(seen) != model.config.num_hidden_layers or any(len(s) != 3 for s in seen):
        return []
    return [(s["q"], s["k"], s["v"]) for s in seen]


def per_token(
    layers: list[tuple[int, int, bool, bool]],
    config: Any,
    mean_len: float,
    grads: list[tuple[bool, bool, bool]] | None = None,
) -> dict[str, float]:
    """The FLOPs of one training token, by part (see the module's docstring). `grads`: `attention_grads` (none:
    every attention gradient is computed)."""
    forward = sum(2 * i * o for i, o, _w, _x in layers)
    inputs = sum(2 * i * o for i, o, _w, x in layers if x)
    weights = sum(2 * i * o for i, o, w, _x in layers if w)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_layer = [4 + 2 * (q + k + (q or k) + v) for q, k, v in grads or [(True, True, True)] * config.num_hidden_layers]
    attention = sum(per_layer) * mean_len * heads * head_dim
    return {
        "forward": forward,
        "backward_inputs": inputs,
        "backward_weights": weights,
        "attention": attention,
        "total": forward + inputs + weights + attention,
    }


def matmul_peak(m: int, k: int, n: int, dtype: Any, device: Any, seconds: float = 0.3) -> float:
    """FLOP/s of torch's matmul at (m x k) @ (k x n) on `device` (the best of a few timed runs)."""
    import torch

    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)

    def sync() -> None:
        if a.device.type == "cuda":  # GPU path: built to torch's interface, not run here (no GPU)
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - t))
    return best


def utilisation(model: Any, example: Any, tokens: int, seconds: float, batch: int, mean_len: float) -> dict[str, Any]:
    """The run's MFU: FLOPs per token x tokens trained per second / the matmul peak at the run's widest linear
    layer's shape (batch x mean length rows), in the model's dtype; every figure it is made of beside it."""
    layers = linear_layers(model, example)
    flops = per_token(layers, model.config, mean_len, attention_grads(model, example))
    k, n = max(((i, o) for i, o, _w, _x in layers), key=lambda s: s[0] * s[1])
    param = next(p for p in model.parameters() if p.dtype.is_floating_point)  # int4/int8 compute in float
    dtype = param.dtype
    peak = matmul_peak(max(1, int(batch * mean_len)), k, n, dtype, param.device)
    achieved = flops["total"] * tokens / seconds if seconds > 0 else 0.0
    return {
        "flops_per_token": {name: round(v) for name, v in flops.items()},
        "achieved_flops": round(achieved),
        "matmul_peak_flops": round(peak),
        "matmul_peak_shape": [max(1, int(batch * mean_len)), k, n, str(dtype).removeprefix("torch.")],
        "mfu": round(achieved / peak, 4) if peak else None,
    }
