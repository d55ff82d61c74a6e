"""DAC's annealing schedule for the UNet LoRA strength, gamma(t).

    gamma(t) = (1 - eta) / 999**2 * (t - 999)**2 + eta      (t = 0 .. 999)

so gamma = eta at pure noise (t = 999) and gamma = 1 at the clean end (t = 0); it stays
near eta over the high-noise half, where the edit's layout is decided, and returns to the
full over-fitted LoRA for the details. Lower eta: more editable, less faithful.

Written over the noise-level fraction f = t / 999 (0 clean .. 1 pure noise) as
gamma = (1 - eta) * (1 - f)**2 + eta, so a backend whose sampler works in sigmas (ComfyUI)
uses the same function with f = model_sampling.timestep(sigma) / 999.
"""

from __future__ import annotations

import torch

from . import params as P

NUM_TRAIN_TIMESTEPS = 1000


def annealing(eta: float):
    """gamma as a function of the noise-level fraction(s) in [0, 1] (a float, or a tensor of
    any shape, per sample), for this eta, checked here once: what a sampler calls each step."""
    eta = float(P.ETA.check(eta))

    def gamma_of(fraction):
        if isinstance(fraction, torch.Tensor):
            f = fraction.to(torch.float64).clamp(0.0, 1.0)
            return ((1.0 - eta) * (1.0 - f) ** 2 + eta).to(torch.float32)
        f = min(max(float(fraction), 0.0), 1.0)
        return (1.0 - eta) * (1.0 - f) ** 2 + eta

    return gamma_of


def annealing_of_timestep(eta: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """gamma as a function of discrete timestep(s) t in [0, num_train_timesteps) (float or
    per-sample tensor), eta checked once: what a training step calls."""
    of_fraction = annealing(eta)
    last = num_train_timesteps - 1

    def gamma_of(t):
        return of_fraction(t.to(torch.float64) / last if isinstance(t, torch.Tensor) else float(t) / last)

    return gamma_of


def gamma_at_fraction(fraction, eta: float):
    """gamma for noise-level fraction(s) in [0, 1]: a float, or a tensor of any shape (per sample)."""
    return annealing(eta)(fraction)


def gamma(t, eta: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """gamma for discrete timestep(s) t in [0, num_train_timesteps): float or per-sample tensor."""
    return annealing_of_timestep(eta, num_train_timesteps)(t)
