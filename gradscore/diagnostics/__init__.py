"""Diagnostics of a score model's error: its observable gradient part, its solenoidal part, KL bounds,
an exact 2-D decomposition and the SIEM baseline (docs/theory.md §2-6)."""
from .errors import decompose, gradient_error, l2_error, solenoidal_error
from .estimate import Estimate
from .exact2d import GridDecomposition, exact_decomposition_2d
from .features import GradientFeatures
from .kl import default_times, kl_bounds, prior_kl
from .likelihood import bits_per_dim, log_likelihood
from .neural import ConvCritic, default_critic, neural_decomposition
from .projection import feature_decomposition
from .report import diagnose
from .siem import siem

__all__ = ["Estimate", "decompose", "gradient_error", "solenoidal_error", "l2_error", "feature_decomposition",
           "neural_decomposition", "GradientFeatures", "kl_bounds", "prior_kl", "default_times",
           "exact_decomposition_2d", "GridDecomposition", "siem", "diagnose", "ConvCritic", "default_critic",
           "log_likelihood", "bits_per_dim"]
