"""Per-example gradients and output Jacobians in batches, with torch.func (vmap over examples).

Parameters are handled as an ordered dict {name: tensor}; flattened vectors follow that order.
Nothing here loops over examples one at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

ParamDict = dict[str, torch.Tensor]


def trainable_parameters(model: nn.Module) -> ParamDict:
    """The model's floating-point parameters, detached, in registration order."""
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if p.is_floating_point()
    }


def num_parameters(params: ParamDict) -> int:
    return sum(p.numel() for p in params.values())


def flatten(tensors: ParamDict | list[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate tensors along the parameter axis, keeping `batch_dims` leading axes."""
    values = list(tensors.values()) if isinstance(tensors, dict) else tensors
    lead = values[0].shape[:batch_dims]
    return torch.cat([v.reshape(*lead, -1) for v in values], dim=-1)


def unflatten(vector: torch.Tensor, like: ParamDict) -> ParamDict:
    out, offset = {}, 0
    for name, p in like.items():
        out[name] = vector[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


def outputs_fn(model: nn.Module) -> Callable[[ParamDict, torch.Tensor], torch.Tensor]:
    """f(params, x) for one example x (no batch axis) -> output vector (C,)."""

    def single(params: ParamDict, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (x.unsqueeze(0),))
        return out.reshape(-1)

    return single


def map_examples(fn: Callable, in_dims: tuple, *args):
    """vmap(fn, in_dims)(*args) over the examples (axis 0 of the mapped arguments). Some kernels have no
    batching rule that works (torch's GRU under vmap fails on its hidden state's shape): then fn runs on
    one example at a time, which gives the same values, more slowly. Results: a tensor or a dict of them."""
    try:
        return vmap(fn, in_dims=in_dims)(*args)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        count = next(a.shape[0] for a, d in zip(args, in_dims) if d == 0)
        rows = [fn(*[a[i] if d == 0 else a for a, d in zip(args, in_dims)]) for i in range(count)]
        if isinstance(rows[0], dict):
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return torch.stack(rows)


def per_example_loss_grads(model: nn.Module, params: ParamDict, loss, inputs, targets) -> torch.Tensor:
    """(B, P) gradients of each example's own loss at `params`."""
    single = outputs_fn(model)

    def example_loss(p, x, y):
        return loss.loss(single(p, x).unsqueeze(0), y.unsqueeze(0)).sum()

    grads = map_examples(grad(example_loss), (None, 0, 0), params, inputs, targets)
    return flatten(grads, batch_dims=1)


def per_example_jacobians(model: nn.Module, params: ParamDict, inputs: torch.Tensor) -> torch.Tensor:
    """(B, C, P) Jacobians of each example's outputs with respect to the parameters."""
    jac = map_examples(jacrev(outputs_fn(model)), (None, 0), params, inputs)
    return flatten(jac, batch_dims=2)


def ggn_vector_product(model: nn.Module, params: ParamDict, loss, inputs, vector: torch.Tensor) -> torch.Tensor:
    """sum_i J_i^T H_i J_i v over the batch (a partial sum; divide by N outside), via JVP and VJP."""
    tangent = unflatten(vector, params)

    def batch_outputs(p):
        return functional_call(model, p, (inputs,))

    outputs, jv = torch.func.jvp(batch_outputs, (params,), (tangent,))
    hjv = torch.einsum("bij,bj->bi", loss.hessian(outputs.detach()), jv)
    _, vjp_fn = torch.func.vjp(batch_outputs, params)
    (result,) = vjp_fn(hjv)
    return flatten(result)
