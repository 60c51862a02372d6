"""jaxsched: optimal batch-size schedules for SGD from the O(h) expansion of its diffusion family."""

from ._problems import (
    AbstractProblem as AbstractProblem,
    GaussianLinearRegression as GaussianLinearRegression,
    LinearRegressionData as LinearRegressionData,
    Problem as Problem,
)

from ._expansion import (
    Expansion as Expansion,
    FirstOrderParts as FirstOrderParts,
    expansion as expansion,
    expected_loss as expected_loss,
    first_order_parts as first_order_parts,
    sensitivity as sensitivity,
)

from ._linreg import (
    exact_expected_loss as exact_expected_loss,
    exact_gd_loss as exact_gd_loss,
    exact_loss_trajectory as exact_loss_trajectory,
    gaussian_correction as gaussian_correction,
    gaussian_gd_loss as gaussian_gd_loss,
    gaussian_phi as gaussian_phi,
    gaussian_sensitivity as gaussian_sensitivity,
)

__version__ = "0.1.0"
