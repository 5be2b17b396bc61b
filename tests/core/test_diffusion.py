import math

import numpy as np
import pytest
import torch

from rdc_studio.core.diffusion import (SIGMA_DATA, log_weight_density, loss_weight, precondition, quantile_grid,
                            sample_training_sigmas, to_model_space, to_pixel_space)


def test_pixel_model_space_round_trip():
    x = torch.rand(3, 1, 4, 4)
    assert torch.allclose(to_pixel_space(to_model_space(x)), x)
    assert to_model_space(torch.zeros(1)).item() == -1 and to_model_space(torch.ones(1)).item() == 1


def test_preconditioning_identities():
    s = torch.logspace(-3, 2, 50, dtype=torch.float64)
    pc = precondition(s)
    sd2 = SIGMA_DATA**2
    # c_skip^2 sd^2 + c_out^2 ... : unit-variance training target (EDM eq. 7/8)
    assert torch.allclose(pc.c_skip + pc.c_out**2 / sd2, torch.ones_like(s))
    assert torch.allclose(pc.c_in**2 * (s**2 + sd2), torch.ones_like(s))
    assert torch.allclose(pc.c_noise, torch.log(s) / 4)
    # lambda(s) * c_out(s)^2 = 1: the effective loss weight of F is one
    assert torch.allclose(loss_weight(s) * pc.c_out**2, torch.ones_like(s))
    # small noise: the denoiser passes the input through; large noise: it predicts from F only
    assert pc.c_skip[0] > 0.999 and pc.c_skip[-1] < 1e-4


def test_training_sigma_distribution():
    g = torch.Generator().manual_seed(0)
    s = sample_training_sigmas(200_000, g)
    assert abs(float(torch.log(s).mean()) + 1.2) < 0.02
    assert abs(float(torch.log(s).std()) - 1.2) < 0.02
    shifted = torch.log(sample_training_sigmas(200_000, torch.Generator().manual_seed(0), p_mean=-0.2, p_std=1.3))
    assert abs(float(shifted.mean()) + 0.2) < 0.02 and abs(float(shifted.std()) - 1.3) < 0.02


@pytest.mark.parametrize("weighting", ["elbo", "edm"])
def test_quantile_grid_equal_mass(weighting):
    grid = quantile_grid(10, weighting, 0.05, 20.0)
    assert grid.sigmas.shape == (10,) and torch.all(grid.sigmas[1:] > grid.sigmas[:-1])
    assert grid.sigmas[0] > 0.05 and grid.sigmas[-1] < 20.0
    # every level is the midpoint quantile of its own equal-mass cell
    u = np.linspace(math.log(0.05), math.log(20.0), 200001)
    w = np.exp(log_weight_density(u, weighting))
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    q = np.interp(np.log(grid.sigmas.numpy()), u, cdf)
    assert np.allclose(q, (np.arange(10) + 0.5) / 10, atol=1e-3)
    assert torch.allclose(grid.weights, grid.weights[0].expand(10))
    # total mass matches a direct integral
    mass = np.trapezoid(w, u) if hasattr(np, "trapezoid") else np.trapz(w, u)
    assert grid.total_mass == pytest.approx(mass, rel=1e-3)


def test_elbo_weighting_is_inverse_cube_per_unit_sigma():
    # per unit ln s the density is s^-2, i.e. s^-3 per unit s
    u = np.log(np.array([0.1, 1.0]))
    logw = log_weight_density(u, "elbo")
    assert logw[0] - logw[1] == pytest.approx(2 * math.log(10))


def test_edm_weighting_divides_by_variance():
    # log-normal density at its mean is 1/(P_std sqrt(2 pi)); the reference bug multiplied instead
    u = np.array([-1.2])
    s = math.exp(-1.2)
    lam = (s * s + 0.25) / (s * 0.5) ** 2
    expected = math.log(lam) - math.log(1.2 * math.sqrt(2 * math.pi))
    assert log_weight_density(u, "edm")[0] == pytest.approx(expected)
    # one standard deviation away the normal factor is exp(-1/2) of the peak
    u2 = np.array([-1.2 + 1.2])
    s2 = math.exp(0.0)
    lam2 = (s2 * s2 + 0.25) / (s2 * 0.5) ** 2
    assert log_weight_density(u2, "edm")[0] - math.log(lam2) == pytest.approx(expected - math.log(lam) - 0.5)


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError):
        quantile_grid(0)
    with pytest.raises(ValueError):
        quantile_grid(4, "edm", 1.0, 0.5)
    with pytest.raises(ValueError):
        quantile_grid(4, "nope")


@pytest.mark.parametrize("weighting", ["edm", "elbo"])
def test_log_grid_is_the_midpoint_rule_in_log_sigma(weighting):
    from rdc_studio.core.diffusion import log_grid, noise_grid

    grid = log_grid(8, weighting, 0.2, 10.0)
    log_s = np.log(grid.sigmas.double().numpy())
    d = (math.log(10.0) - math.log(0.2)) / 8
    assert np.allclose(np.diff(log_s), d, atol=1e-6)  # equally spaced in ln sigma
    assert math.isclose(log_s[0], math.log(0.2) + d / 2, abs_tol=1e-6)  # midpoints
    assert np.allclose(grid.weights.numpy(), np.exp(log_weight_density(log_s, weighting)) * d, rtol=1e-5)
    # the same integral as the equal-mass grid, to quadrature accuracy
    fine = log_grid(4000, weighting, 0.2, 10.0)
    assert math.isclose(float(fine.weights.sum()), float(quantile_grid(8, weighting, 0.2, 10.0).weights.sum()),
                        rel_tol=1e-4)
    assert noise_grid("log", 8, weighting, 0.2, 10.0).sigmas.tolist() == grid.sigmas.tolist()
