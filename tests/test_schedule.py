import pytest
import torch

from dac_core.schedule import gamma, gamma_at_fraction


# DAC_SPEC.md: for eta 0.8, gamma is 0.80 at t=958, 0.81 at 750, 0.85 at 500, 0.91 at 250,
# 1.0 at 1; for eta 0.4: 0.40, 0.44, 0.55, 0.74, 1.0.
@pytest.mark.parametrize(
    "eta, expected",
    [(0.8, [0.80, 0.81, 0.85, 0.91, 1.0]), (0.4, [0.40, 0.44, 0.55, 0.74, 1.0])],
)
def test_gamma_matches_the_spec_table(eta, expected):
    ts = [958, 750, 500, 250, 1]
    assert [round(gamma(t, eta), 2) for t in ts] == expected


def test_gamma_end_points_and_reference_formula():
    for eta in (0.4, 0.7, 0.8, 1.0):
        assert gamma(999, eta) == pytest.approx(eta)
        assert gamma(0, eta) == pytest.approx(1.0)
        for t in (0, 13, 500, 998):
            assert gamma(t, eta) == pytest.approx((1 - eta) / 999**2 * (t - 999) ** 2 + eta)


def test_gamma_is_per_sample_for_a_batch_and_equals_fraction_form():
    t = torch.tensor([0, 250, 500, 999])
    g = gamma(t, 0.6)
    assert g.shape == (4,)
    assert torch.allclose(g, torch.tensor([gamma(int(x), 0.6) for x in t]))
    # the fraction form a sampler uses, against the spec's timestep form
    spec_form = torch.tensor([(1 - 0.6) / 999**2 * (int(x) - 999) ** 2 + 0.6 for x in t])
    assert torch.allclose(gamma_at_fraction(t.double() / 999, 0.6), spec_form, rtol=0, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5, float("nan")])
def test_eta_outside_range_is_rejected(eta):
    with pytest.raises(ValueError, match=r"eta must be a number in \(0, 1\], got "):
        gamma(10, eta)
