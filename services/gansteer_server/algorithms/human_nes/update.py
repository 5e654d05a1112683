"""After-human gradient descent (seed 004, eq. 6): the image-space estimates carried into the generator's weights.

dV/dtheta = sum_n (dV/dx_n)^T dx_n/dtheta is one vector-Jacobian product: `images.backward(-g_hat)` (minus: the
optimizer minimises, the person's judgement is to be raised). The seed's code asked one gradient per pixel instead;
`per_pixel_gradient` is that loop, kept as the reference the tests and the benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

#: The seed's optimizer for the generator (its Matlab training settings): Adam, lr 2e-5, betas (0.5, 0.999).
LEARNING_RATE = 2e-5
BETAS = (0.5, 0.999)

Render = Callable[[], Tensor]


def adam(parameters: Iterable[nn.Parameter], lr: float = LEARNING_RATE) -> torch.optim.Adam:
    return torch.optim.Adam(parameters, lr=lr, betas=BETAS)


def ascend(render: Render, g_hat: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One AHGD step: render the N images (with the graph), one backward pass of -g_hat (N, C, H, W) into the
    parameters, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    images = render()
    images.backward(-g_hat.reshape(images.shape).to(images))
    optimizer.step()


def parameter_gradient(render: Render, g_hat: Tensor, parameters: list[nn.Parameter]) -> list[Tensor]:
    """sum_n g_hat_n^T dx_n/dtheta by one vector-Jacobian product."""
    images = render()
    return list(torch.autograd.grad(images, parameters, grad_outputs=g_hat.reshape(images.shape).to(images)))


def per_pixel_gradient(
    render: Render, g_hat: Tensor, parameters: list[nn.Parameter], pixels: Tensor | None = None
) -> list[Tensor]:
    """The same sum one pixel at a time (the seed's loop): a gradient of each output pixel, weighted and summed.
    `pixels` limits the loop to some flat pixel indices (the benchmark times a subset); all by default."""
    images = render()
    flat, weights = images.reshape(-1), g_hat.reshape(-1).to(images)
    total = [torch.zeros_like(p) for p in parameters]
    indices = range(flat.numel()) if pixels is None else [int(i) for i in pixels]
    for i in indices:
        grads = torch.autograd.grad(flat[i], parameters, retain_graph=True, allow_unused=True)
        for acc, grad in zip(total, grads, strict=True):
            if grad is not None:
                acc.add_(grad, alpha=float(weights[i]))
    return total
