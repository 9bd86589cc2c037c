"""FID/KID maths on the device (float64 torch) against torch-fidelity's own functions, on CPU tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation import fid as fid_module
from lawa_diffusion.maths import fid_kid as metric_maths
from tests.helpers import relative_error


def features(n: int, d: int, seed: int, rank: int | None = None, shift: float = 0.0) -> torch.Tensor:
    """Random features [n, d] (float32); with ``rank``, nearly of that rank (a singular covariance up to noise)."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    else:
        x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g,
                                                                                  dtype=torch.float64)
        x += 1e-7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x + shift).abs().float()  # non-negative, as Inception pool features are


def fidelity_fid(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """torch-fidelity's FID of two feature sets given as float64 (its maths then run in float64 throughout)."""
    s1, s2 = fid_features_to_statistics(gen.double()), fid_features_to_statistics(ref.double())
    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def reference_of(ref: torch.Tensor) -> fid.ReferenceStats:
    stats = fid_features_to_statistics(ref)
    return fid.ReferenceStats(stats["mu"], stats["sigma"], ref.shape[0], None, "pool", ref)


CASES = [  # (generated n, reference n, dim, rank or None)
    (200, 300, 16, None),
    (500, 400, 64, None),
    (40, 60, 64, None),  # fewer images than features: both covariances singular
    (300, 300, 64, 6),  # nearly rank 6
    (1500, 2000, 256, None),
]


@pytest.mark.parametrize("n_gen,n_ref,dim,rank", CASES)
def test_fid_equals_torch_fidelity_in_float64(n_gen, n_ref, dim, rank):
    gen, ref = features(n_gen, dim, 1, rank, shift=0.3), features(n_ref, dim, 2, rank)
    expected = fidelity_fid(gen, ref)
    stats = fid_features_to_statistics(ref.double())
    got = metric_maths.fid_from_features(gen, stats["mu"], stats["sigma"])
    assert got.dtype == torch.float64 and got.device == gen.device
    assert relative_error(got.item(), expected) <= 1e-6


@pytest.mark.parametrize("n_gen,n_ref,dim,rank", CASES[:4])
def test_forced_device_path_equals_the_cpu_path(n_gen, n_ref, dim, rank):
    """The single place where features become metrics gives the same FID and KID either way."""
    gen, ref = features(n_gen, dim, 3, rank, shift=0.2), features(n_ref, dim, 4, rank)
    reference = reference_of(ref)
    kw = dict(kid=True, kid_subsets=7, kid_subset_size=min(n_gen, n_ref) // 2)
    cpu = fid.metrics_from_features(gen, reference, on_device=False, **kw)
    dev = fid.metrics_from_features(gen, reference, on_device=True, **kw)
    assert set(dev) == set(cpu) and dev["kid_subset_size"] == cpu["kid_subset_size"]
    assert relative_error(dev["fid"], cpu["fid"]) <= 1e-6
    # torch-fidelity's CPU KID runs in float32 (NumPy on float32 features); the device maths in float64.
    scale = abs(cpu["kid_mean"]) + cpu["kid_std"]
    assert abs(dev["kid_mean"] - cpu["kid_mean"]) <= 1e-4 * scale
    assert abs(dev["kid_std"] - cpu["kid_std"]) <= 1e-4 * scale


@pytest.mark.parametrize("n_gen,n_ref,dim,subsets,size", [(50, 80, 16, 10, 20), (300, 200, 64, 25, 200),
                                                           (120, 120, 32, 3, 120)])
def test_kid_equals_torch_fidelity_same_subsets(n_gen, n_ref, dim, subsets, size):
    gen, ref = features(n_gen, dim, 5, shift=0.1), features(n_ref, dim, 6)
    expected = kid_features_to_metric(gen.double(), ref.double(), kid_subsets=subsets, kid_subset_size=size,
                                      verbose=False)
    mean, std = metric_maths.kid(gen, ref, subsets=subsets, subset_size=size)
    assert mean.item() == pytest.approx(expected[KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-15)
    assert std.item() == pytest.approx(expected[KEY_METRIC_KID_STD], rel=1e-9, abs=1e-15)


def test_kid_depends_on_the_seed_as_torch_fidelity_does():
    gen, ref = features(60, 8, 7, shift=0.5), features(60, 8, 8)
    other = kid_features_to_metric(gen.double(), ref.double(), kid_subsets=4, kid_subset_size=20, rng_seed=3,
                                   verbose=False)
    mean, _ = metric_maths.kid(gen, ref, subsets=4, subset_size=20, seed=3)
    default, _ = metric_maths.kid(gen, ref, subsets=4, subset_size=20)
    assert mean.item() == pytest.approx(other[KEY_METRIC_KID_MEAN], rel=1e-9)
    assert mean.item() != default.item()


def test_reference_factor_is_cached_per_array_and_never_stale():
    gen = features(100, 16, 9, shift=0.2)
    refs = [features(150, 16, seed) for seed in (10, 11)]
    stats = [fid_features_to_statistics(r.double()) for r in refs]
    for _ in range(2):  # second round served from the cache
        for r, s in zip(refs, stats):
            factor = fid_module.device_copy(metric_maths.factor_of, s["sigma"], "cpu")
            got = metric_maths.fid_from_features(gen, s["mu"], s["sigma"], factor).item()
            assert relative_error(got, fidelity_fid(gen, r)) <= 1e-6
    key = ("factor_of", id(stats[0]["sigma"]), "cpu")
    assert key in fid_module._DEVICE_COPIES
    del stats[0]
    assert key not in fid_module._DEVICE_COPIES


def test_sqrt_factor_of_a_singular_matrix():
    a = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = a @ a.T
    r = metric_maths.sqrt_factor(sigma)
    assert torch.allclose(r @ r.T, sigma, atol=1e-10)
    assert not torch.isnan(r).any()
    np.testing.assert_allclose(metric_maths.trace_sqrt_product(r, sigma).item(), sigma.trace().item(), rtol=1e-7)


@pytest.mark.cuda
def test_gpu_features_take_the_device_path_and_match_torch_fidelity():
    gen, ref = features(1500, 256, 12, shift=0.2), features(2000, 256, 13)
    reference = reference_of(ref)
    kw = dict(kid=True, kid_subsets=20, kid_subset_size=500)
    cpu = fid.metrics_from_features(gen, reference, **kw)
    gpu = fid.metrics_from_features(gen.cuda(), reference, **kw)
    assert relative_error(gpu["fid"], fidelity_fid(gen, ref)) <= 1e-6
    assert relative_error(gpu["fid"], cpu["fid"]) <= 1e-6
    expected = kid_features_to_metric(gen.double(), ref.double(), kid_subsets=20, kid_subset_size=500, verbose=False)
    assert gpu["kid_mean"] == pytest.approx(expected[KEY_METRIC_KID_MEAN], rel=1e-9)
    assert gpu["kid_std"] == pytest.approx(expected[KEY_METRIC_KID_STD], rel=1e-9)


def test_kid_defaults_are_read_under_torch_fidelity_03_key_names(monkeypatch):
    """torch-fidelity 0.3 names the kernel defaults kid_degree / kid_gamma / kid_coef0 (0.4: kid_kernel_poly_*)."""
    from torch_fidelity import defaults

    new = metric_maths.kid_protocol()
    old_style = {k: v for k, v in defaults.DEFAULTS.items() if not k.startswith("kid_kernel")}
    old_style.update(kid_degree=2, kid_gamma=0.5, kid_coef0=3)
    monkeypatch.setattr(defaults, "DEFAULTS", old_style)
    assert metric_maths.kid_protocol() == {"degree": 2, "gamma": 0.5, "coef0": 3, "seed": new["seed"]}
    gen, ref = features(60, 8, 7, shift=0.5), features(60, 8, 8)
    mean, _ = metric_maths.kid(gen, ref, subsets=4, subset_size=20)
    expected, _ = metric_maths.kid(gen, ref, subsets=4, subset_size=20, degree=2, gamma=0.5, coef0=3)
    assert mean.item() == expected.item()
    monkeypatch.setattr(defaults, "DEFAULTS", {"rng_seed": 1})
    with pytest.raises(ValueError, match="none of kid_kernel_poly_degree, kid_degree"):
        metric_maths.kid_protocol()
