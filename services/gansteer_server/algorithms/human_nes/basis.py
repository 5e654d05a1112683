"""The perturbation bases of human NES (seed 004, section 2.3 and 3.3): isotropic pixels ("even") or the top q
principal components of real images scaled by their eigenvalues ("uneven", the seed's eigenfaces).

A basis is a (D, q) matrix V with orthonormal columns and the eigenvalues (q,) of the images' covariance along them.
The full covariance sigma^2 V D V^T has rank q < D, so nothing here ever inverts it: the estimator works in the
q coordinates (`estimator.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Relative eigenvalue below which a component carries no variance of the images (numerical noise).
RANK_TOLERANCE = 1e-6


class BasisError(ValueError):
    """A basis that cannot be built as asked (too few images, q past the images' rank); `field` names the option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class PCABasis:
    """Orthonormal components V (D, q), their eigenvalues D (q,) (descending, > 0) and the images' mean (D,)."""

    components: Tensor
    eigenvalues: Tensor
    mean: Tensor
    shape: tuple[int, int, int]  # (C, H, W) of the images it was built from

    @property
    def q(self) -> int:
        return int(self.components.shape[1])

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])


def max_components(images: Tensor) -> int:
    """How many components images (N, C, H, W) can give at most: the rank of their centred matrix, <= N - 1."""
    flat = images.reshape(len(images), -1).double()
    centred = flat - flat.mean(0, keepdim=True)
    values = torch.linalg.svdvals(centred) ** 2
    if len(values) == 0 or float(values[0]) == 0.0:
        return 0
    return int((values > RANK_TOLERANCE * values[0]).sum())


def pca_basis(images: Tensor, q: int = 0, *, field: str = "basis_components") -> PCABasis:
    """The top `q` principal components of images (N, C, H, W) in [-1, 1] (q=0: all with non-zero variance).
    Refuses (BasisError naming `field`) a q the images' rank does not allow, rather than padding with null
    directions whose eigenvalue 0 the estimator would divide by."""
    if images.ndim != 4 or len(images) < 2:
        raise BasisError("basis_images", f"a PCA basis needs at least 2 images (N, C, H, W), got {tuple(images.shape)}")
    flat = images.reshape(len(images), -1).double()
    mean = flat.mean(0)
    # Economy SVD of the centred images: right singular vectors are the eigenvectors of their covariance (eq. 3).
    _, singular, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    eigenvalues = singular**2 / (len(images) - 1)
    rank = int((eigenvalues > RANK_TOLERANCE * eigenvalues[0]).sum()) if float(eigenvalues[0]) > 0 else 0
    if rank == 0:
        raise BasisError("basis_images", "the basis images are all the same: they span no direction")
    if q < 0 or q > rank:
        raise BasisError(field, f"must be 0 (all) to {rank}, the rank of the {len(images)} basis images; got {q}")
    q = q or rank
    return PCABasis(
        components=vh[:q].T.float().contiguous(),
        eigenvalues=eigenvalues[:q].float(),
        mean=mean.float(),
        shape=(int(images.shape[1]), int(images.shape[2]), int(images.shape[3])),
    )


def scenes_images(n: int = 512, seed: int = 0, resolution: int = 32) -> Tensor:
    """Real images from the `scenes` renderer, float (N, 3, H, W) in [-1, 1]: the default basis images."""
    from gansteer_server.data.scenes import render_scenes

    pixels = torch.from_numpy(render_scenes(n, seed=seed, resolution=resolution).images)
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
