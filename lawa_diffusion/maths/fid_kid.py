"""FID and KID maths in float64 on the features' device (used when the features are on a GPU).

The results are those of torch-fidelity's ``fid_statistics_to_metric`` and ``kid_features_to_metric``:
the same statistics (mean, covariance with N - 1), the same KID protocol (torch-fidelity's defaults for
the polynomial kernel and the random seed, its subsets drawn by the same NumPy generator in the same
order) and the same unbiased MMD estimate (torchmetrics' ``poly_mmd``, which mirrors torch-fidelity's).
Only the trace of the matrix square root is written here: Tr sqrt(S1 S2) is the sum of the square roots
of the eigenvalues of the symmetric matrix R^T S2 R with S1 = R R^T, so two symmetric eigensolvers
(which run on the GPU) replace the general one (which does not). Nothing here synchronises with the
host until a caller reads a result.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


def as_float64(x: Array, device) -> torch.Tensor:
    """``x`` as a float64 tensor on ``device`` (NumPy arrays and tensors alike)."""
    x = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    return x.to(device=device, dtype=torch.float64)


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of features [N, D] in float64, as ``fid_features_to_statistics`` (ddof 1)."""
    f = features.to(torch.float64)
    return f.mean(dim=0), torch.cov(f.T)


def sqrt_factor(sigma: torch.Tensor) -> torch.Tensor:
    """R with R R^T = sigma for a symmetric positive semi-definite ``sigma`` (round-off negatives clamped)."""
    w, v = torch.linalg.eigh(sigma)
    return v * w.clamp(min=0).sqrt()


def factor_of(sigma: Array, device) -> torch.Tensor:
    """:func:`sqrt_factor` of ``sigma`` in float64 on ``device``."""
    return sqrt_factor(as_float64(sigma, device))


def trace_sqrt_product(factor: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Tr sqrt(S1 S2) from S1 = factor factor^T and S2 = ``sigma``."""
    m = factor.T @ sigma @ factor
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def fid(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: Array, sigma2: Array,
        factor2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), a float64 0-d tensor on mu1's device.

    factor2: :func:`sqrt_factor` of sigma2 when already known (a reference's, kept between evaluations).
    """
    device = mu1.device
    mu2, sigma2 = as_float64(mu2, device), as_float64(sigma2, device)
    factor2 = sqrt_factor(sigma2) if factor2 is None else factor2
    diff = mu1 - mu2
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(factor2, sigma1)


def fid_from_features(features: torch.Tensor, mu_ref: Array, sigma_ref: Array,
                      factor_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FID of features [N, D] against reference statistics (NumPy or torch), on the features' device.

    factor_ref: :func:`factor_of` the reference's sigma when the caller keeps it between evaluations."""
    mu, sigma = statistics(features)
    return fid(mu, sigma, mu_ref, sigma_ref, factor_ref)


def kid_subset_indices(num_1: int, num_2: int, subsets: int, subset_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The subsets torch-fidelity's ``kid_features_to_metric`` draws: [subsets, subset_size] indices of each set."""
    rng = np.random.RandomState(seed)
    idx_1, idx_2 = [], []
    for _ in range(subsets):
        idx_1.append(rng.choice(num_1, subset_size, replace=False))
        idx_2.append(rng.choice(num_2, subset_size, replace=False))
    return torch.from_numpy(np.stack(idx_1)), torch.from_numpy(np.stack(idx_2))


# torch-fidelity's names of the KID kernel defaults: 0.4 on ("kid_kernel_poly_*"), 0.3 ("kid_*")
KID_DEFAULT_KEYS = {"degree": ("kid_kernel_poly_degree", "kid_degree"), "gamma": ("kid_kernel_poly_gamma", "kid_gamma"),
                    "coef0": ("kid_kernel_poly_coef0", "kid_coef0"), "seed": ("rng_seed",)}


def kid_protocol() -> dict:
    """torch-fidelity's KID defaults: degree, gamma (None: 1 / D), coef0 and the subset seed (under the key
    names of torch-fidelity 0.4 or of 0.3)."""
    from torch_fidelity.defaults import DEFAULTS

    out = {}
    for option, keys in KID_DEFAULT_KEYS.items():
        found = [key for key in keys if key in DEFAULTS]
        if not found:
            raise ValueError(f"torch-fidelity's DEFAULTS has none of {', '.join(keys)} (the KID {option}); "
                             "install torch-fidelity 0.3 or 0.4")
        out[option] = DEFAULTS[found[0]]
    return out


def kid(features_1: torch.Tensor, features_2: Array, *, subsets: int, subset_size: int,
        degree: Optional[int] = None, gamma: Optional[float] = None, coef0: Optional[float] = None,
        seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the polynomial-kernel MMD² over ``subsets`` random subsets, as ``kid_features_to_metric``
    (features_1 the generated set, features_2 the reference); float64 0-d
    tensors on features_1's device.

    Unset kernel options and seed are torch-fidelity's defaults.
    """
    from torchmetrics.image.kid import poly_mmd

    given = {"degree": degree, "gamma": gamma, "coef0": coef0, "seed": seed}
    opts = {k: given[k] if given[k] is not None else v for k, v in kid_protocol().items()}
    device = features_1.device
    f1, f2 = features_1.to(torch.float64), as_float64(features_2, device)
    idx_1, idx_2 = kid_subset_indices(f1.shape[0], f2.shape[0], subsets, subset_size, opts["seed"])
    idx_1, idx_2 = idx_1.to(device), idx_2.to(device)
    mmds = torch.stack([poly_mmd(f1[i1], f2[i2], opts["degree"], opts["gamma"], opts["coef0"])
                        for i1, i2 in zip(idx_1, idx_2)])
    return mmds.mean(), mmds.std(correction=0)
