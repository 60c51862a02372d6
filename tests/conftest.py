"""Test configuration: float64 everywhere, so tolerances reflect the mathematics, not rounding."""

import jax

jax.config.update("jax_enable_x64", True)
