"""jaxsched: optimal batch-size schedules for SGD from the O(h) expansion of its diffusion family."""

from ._problems import (
    AbstractProblem as AbstractProblem,
    GaussianLinearRegression as GaussianLinearRegression,
    LinearRegressionData as LinearRegressionData,
    Problem as Problem,
)

__version__ = "0.1.0"
