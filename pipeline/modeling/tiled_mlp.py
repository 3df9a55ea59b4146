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

import torch


def tiled_shards(tokens: int, chunk: int) -> int:
    """How many chunks a ``(rows, tokens, hidden)`` input is cut into: ``k = ceil(tokens / chunk)``. DeepSpeed cuts
    the tokens into k pieces with ``torch.chunk`` in forward and the flattened ``rows · tokens`` positions in backward,
    and releases the held-back gradients at the k-th piece, so both cuts must give exactly k pieces. They do, for any
    rows: a piece has ``s = ceil(rows · tokens / k) <= rows · chunk`` positions (as tokens <= k · chunk), and
    ``(k - 1) · chunk < tokens`` gives ``s · (k - 1) < rows · tokens``: the first k - 1 pieces leave something for
    the k-th. Every rank computes k from the same ``seq_len`` (or its SP shard), so ZeRO-3's per-call parameter
    gathers stay in step."""
    if chunk < 1:
        raise ValueError(f"mlp_chunk={chunk} must be at least 1")
    return max(1, -(-tokens // chunk))


class _TiledForward:
    """The ``forward`` of one tiled ``mlp`` instance: its own forward, run through DeepSpeed's ``TiledMLP``."""

    def __init__(self, mlp: torch.nn.Module, forward, chunk: int):
        self.mlp, self.forward, self.chunk = mlp, forward, chunk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, T, hidden) → (B, T, hidden)
        shards = tiled_shards(x.shape[-2], self.chunk)
        if shards == 1:
            return self.forward(x)
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        params = [p for p in self.mlp.parameters() if p.requires_grad]
        if params and torch.is_grad_enabled() and not x.requires_grad:
            # the parameters are not inputs of the autograd function: without an input that requires grad its output
            # would not either, and adapters on the MLP alone (frozen layers below) would get no gradient
            x = x.detach().requires_grad_()
        return TiledMLP.apply(lambda module, xs: self.forward(xs), self.mlp, x, shards, params)


def _decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m.mlp for m in base.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]


def tiled_mlp_layers(model: torch.nn.Module) -> int:
    """How many decoder layers of ``model`` have their MLP tiled (what a bench records, from the model itself)."""
    return sum(isinstance(mlp.forward, _TiledForward) for mlp in _decoder_mlps(model))


def enable_tiled_mlp(model: torch.nn.Module, chunk: int) -> int:
    """Route the ``mlp`` of every decoder layer of ``model`` (a causal LM or a peft model) through the tiling, in
    chunks of ``chunk`` tokens (an MLP tiled already keeps its chunk); returns the number of layers."""
    tiled_shards(1, chunk)  # rejects chunk < 1 before touching the model
    mlps = _decoder_mlps(model)
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no decoder layer with an `mlp` module to tile")
    for mlp in mlps:
        if not isinstance(mlp.forward, _TiledForward):
            mlp.forward = _TiledForward(mlp, mlp.forward, chunk)
    return len(mlps)
