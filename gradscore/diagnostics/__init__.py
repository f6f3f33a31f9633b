"""Diagnostics of a score model's error: its observable gradient part, its solenoidal part, KL bounds,
an exact 2-D decomposition and the SIEM baseline (THEORY sections 2-6)."""
from .errors import gradient_error, l2_error, solenoidal_error
from .estimate import Estimate
from .exact2d import GridDecomposition, exact_decomposition_2d
from .features import GradientFeatures
from .neural import ConvCritic, critic_gradient_error, default_critic
from .kl import default_times, kl_bounds, prior_kl
from .likelihood import bits_per_dim, log_likelihood
from .projection import feature_decomposition
from .report import diagnose
from .siem import siem

__all__ = ["Estimate", "gradient_error", "solenoidal_error", "l2_error", "feature_decomposition",
           "GradientFeatures", "kl_bounds", "prior_kl", "default_times", "exact_decomposition_2d",
           "GridDecomposition", "siem", "diagnose", "critic_gradient_error", "ConvCritic", "default_critic",
           "log_likelihood", "bits_per_dim"]
