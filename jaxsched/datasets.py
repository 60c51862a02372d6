"""Built-in real data sets as jaxsched problems (scikit-learn's bundled data: no download)."""

from __future__ import annotations

import numpy as np

from ._problems import LinearRegressionData

__all__ = ["standardise", "diabetes_data", "diabetes_problem"]


def standardise(a: np.ndarray) -> np.ndarray:
    """Centre each column and scale it to unit standard deviation (population formula, ddof=0);
    constant columns are only centred."""
    a = np.asarray(a, dtype=np.float64)
    sd = a.std(axis=0)
    return (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def diabetes_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes data (442 x 10), features and target standardised."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    return standardise(X), standardise(y[:, None])[:, 0]


def diabetes_problem(replace: bool = True) -> LinearRegressionData:
    """Least squares on the standardised diabetes data with ``x0 = 0`` (theory 5.3)."""
    X, y = diabetes_data()
    return LinearRegressionData(X, y, np.zeros(X.shape[1]), replace=replace)
