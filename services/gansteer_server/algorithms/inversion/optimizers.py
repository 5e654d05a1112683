"""Moved to `gansteer_server.algorithms.search.optimizers`; this name stays while `jobs/kinds/inversion.py` and
`bench/inversion.py` import `is_gradient_optimizer` from here."""

from gansteer_server.algorithms.search.optimizers import is_gradient_optimizer

__all__ = ["is_gradient_optimizer"]
