"""One institution's part of a training round: per-example gradients, each clipped to L2 norm C, scaled by gamma
and randomly rounded to integers, then summed; plus a count slot. The result is the integer vector it noises and
encrypts (training/secure_sum.py).

Rounding each example's scaled gradient (not the sum) bounds what one example can move: ||r(gamma g)||_2 <=
gamma C + sqrt(d), whatever the rounding draws (training/accounting.py). torch is imported here, lazily, by whoever
trains; nothing else in Fusion imports this module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fusion.errors import FusionError

if TYPE_CHECKING:
    import torch


def per_example_gradients(model: torch.nn.Module, features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(examples, parameters) float64: the gradient of each example's cross-entropy loss (torch.func vmap)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, y.unsqueeze(0))

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.long)
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([grads[name].reshape(x.shape[0], -1) for name in params], dim=1)
    return flat.detach().to(torch.float64).numpy()


def clip_rows(gradients: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most `clip` (rows within it unchanged)."""
    if not clip > 0:
        raise ValueError(f"the clipping norm must be positive, got {clip}")
    norms = np.linalg.norm(gradients, axis=1, keepdims=True)
    return gradients * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def random_round(values: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Unbiased randomised rounding to int64: floor(x) + Bernoulli(x - floor(x)), so |r(x) - x| < 1 per entry."""
    low = np.floor(values)
    return (low + (generator.random(values.shape) < values - low)).astype(np.int64)


def count_weight(scale: float, clip: float, share: float = 0.25) -> int:
    """What one example adds to the count slot: a quarter of its largest gradient move (gamma C), so the count
    costs sqrt(1 + 1/16) = 1.03x in sensitivity and is still read to a few examples after a few rounds."""
    return max(1, math.ceil(share * scale * clip))


def contribution_vector(
    gradients: np.ndarray, *, clip: float, scale: float, generator: np.random.Generator
) -> np.ndarray:
    """(parameters + 1,) int64: the sum over examples of r(scale * clip(g)), then the count slot (examples * w).
    A non-finite gradient (features beyond float32, a model that diverged) would round to int64's extremes and move
    the vector without bound: refused."""
    if not np.isfinite(gradients).all():
        raise FusionError(
            "a training example's gradient is not finite (a feature too large for float32, or a model whose "
            "parameters diverged: lower the learning rate); nothing is contributed"
        )
    rounded = random_round(scale * clip_rows(gradients, clip), generator)  # (examples, parameters)
    count = gradients.shape[0] * count_weight(scale, clip)
    return np.concatenate([rounded.sum(axis=0), np.array([count], dtype=np.int64)])
