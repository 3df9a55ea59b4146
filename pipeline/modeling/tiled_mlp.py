"""Tiled MLP (ALST): every decoder layer's MLP runs over chunks of ``mlp_chunk`` tokens, and in backward each chunk
is recomputed and back-propagated on its own, so a layer's ``(T, intermediate)`` activations (gate, up, their
product and their gradients: the largest tensors of a long-row step once the layers are checkpointed and the loss
is tiled) exist for one chunk at a time.

The autograd function is DeepSpeed's own ``TiledMLP`` (``deepspeed.runtime.sequence_parallel.ulysses_sp``, the ALST
implementation): under ZeRO it holds a chunk's parameter gradients back from the reduction until the last chunk.
Each layer's ``mlp`` module keeps its class, parameters and state-dict names; only that instance's ``forward`` is
routed through the tiling (so export, LoRA adapters and ZeRO-3's per-module hooks see the same module).

    T = 6, mlp_chunk = 2: forward  [x0 x1 | x2 x3 | x4 x5] → three MLP calls without autograd, outputs concatenated
                          backward  per chunk: recompute its MLP with autograd, back-propagate its slice of dy
"""

from __future__ import annotations

import functools

import torch


def tiled_shards(tokens: int, rows: int, chunk: int) -> int:
    """How many chunks a ``(rows, tokens, hidden)`` input is cut into: ``ceil(tokens / chunk)``, lowered until
    ``torch.chunk`` gives exactly that many pieces both of the tokens (forward) and of the ``rows · tokens``
    flattened positions (backward): DeepSpeed releases the held-back gradients at the last of ``shards`` pieces,
    so a missing piece would hold them forever. Every rank computes the same number from the same shape, so ZeRO-3's
    per-call parameter gathers stay in step."""
    if chunk < 1:
        raise ValueError(f"mlp_chunk={chunk} must be at least 1")
    shards = max(1, -(-tokens // chunk))
    exact = lambda n, k: -(-n // k) * (k - 1) < n  # torch.chunk(n, k) gives k pieces
    while shards > 1 and not (exact(tokens, shards) and exact(rows * tokens, shards)):
        shards -= 1
    return shards


def _tiled_forward(mlp: torch.nn.Module, forward, chunk: int, x: torch.Tensor) -> torch.Tensor:
    # x (B, T, hidden) → (B, T, hidden)
    shards = tiled_shards(x.shape[-2], x[..., 0, 0].numel(), chunk)
    if shards == 1:
        return forward(x)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    params = [p for p in mlp.parameters() if p.requires_grad]
    if params and torch.is_grad_enabled() and not x.requires_grad:
        # the parameters are not inputs of the autograd function: without an input that requires grad its output
        # would not either, and adapters on the MLP alone (frozen layers below) would get no gradient
        x = x.detach().requires_grad_()
    return TiledMLP.apply(lambda module, xs: forward(xs), mlp, x, shards, params)


def enable_tiled_mlp(model: torch.nn.Module, chunk: int) -> int:
    """Route the ``mlp`` of every decoder layer of ``model`` (a causal LM or a peft model) through the tiling, in
    chunks of ``chunk`` tokens; returns the number of layers."""
    if chunk < 1:
        raise ValueError(f"mlp_chunk={chunk} must be at least 1")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    if not layers:
        raise ValueError(f"{type(base).__name__} has no decoder layer with an `mlp` module to tile")
    for layer in layers:
        mlp = layer.mlp
        if not isinstance(mlp.forward, functools.partial):  # already tiled: leave it
            mlp.forward = functools.partial(_tiled_forward, mlp, mlp.forward, chunk)
    return len(layers)
