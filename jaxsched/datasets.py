"""Built-in real data sets as jaxsched problems (scikit-learn's bundled data: no download)."""

from __future__ import annotations

import numpy as np

from ._problem.linear import GaussianLinearRegression, LinearRegressionData

__all__ = [
    "csv_problem",
    "diabetes_data",
    "diabetes_problem",
    "gaussian_problem",
    "gaussian_spectrum",
    "load_csv",
    "standardise",
]


def standardise(a: np.ndarray) -> np.ndarray:
    """Centre each column and scale it to unit standard deviation (population formula, ddof=0);
    constant columns are only centred."""
    a = np.asarray(a, dtype=np.float64)
    sd = a.std(axis=0)
    return (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _sklearn_data_file(name: str) -> str | None:
    """The path of one of scikit-learn's bundled data files, found without importing scikit-learn
    (``import sklearn.datasets`` costs 1-2 s, most of a short command's start-up); None when
    scikit-learn is missing or lays its files out differently."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")  # locates the package, does not run it
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
    return path if os.path.isfile(path) else None


def diabetes_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes data (442 x 10), features and target standardised.

    Read from the files scikit-learn ships (its ``load_diabetes`` reads the same ones and only
    rescales the columns, which standardising undoes); ``load_diabetes`` itself where they are not
    found."""
    import gzip

    data = _sklearn_data_file("diabetes_data_raw.csv.gz")
    target = _sklearn_data_file("diabetes_target.csv.gz")
    if data is not None and target is not None:
        with gzip.open(data, "rt") as f:
            X = np.loadtxt(f)
        with gzip.open(target, "rt") as f:
            y = np.loadtxt(f)
    else:
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True)
    return standardise(X), standardise(y[:, None])[:, 0]


def diabetes_problem(replace: bool = True) -> LinearRegressionData:
    """Least squares on the standardised diabetes data with ``x0 = 0`` (docs/theory.md §5.3)."""
    X, y = diabetes_data()
    return LinearRegressionData(X, y, np.zeros(X.shape[1]), replace=replace)


# ------------------------------------------------------------------------------------------------
# Synthetic Gaussian problems (docs/theory.md §5.1)
# ------------------------------------------------------------------------------------------------
SPECTRA = ("geometric", "power", "flat")


def gaussian_spectrum(dim: int, *, spectrum: str = "geometric", condition: float = 100.0) -> np.ndarray:
    """Eigenvalues ``lam_1 = 1 >= ... >= lam_d = 1 / condition`` of a feature covariance.

    Args:
        dim: dimension ``d >= 1``.
        spectrum: ``"geometric"`` (``lam_i = condition^(-(i-1)/(d-1))``, evenly spaced in log),
            ``"power"`` (``lam_i = i^(-alpha)`` with ``alpha = ln(condition) / ln(d)``, a power law
            as in kernel and random-feature regression) or ``"flat"`` (all ones; ``condition``
            ignored).
        condition: ratio of the largest to the smallest eigenvalue, ``>= 1``.

    Returns:
        ``(dim,)`` NumPy array, decreasing.

    Raises:
        ValueError: naming the argument, for ``dim < 1``, an unknown ``spectrum`` or
            ``condition < 1``.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: must be an integer >= 1, got {dim!r}")
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum: must be one of {SPECTRA}, got {spectrum!r}")
    condition = float(condition)
    if not np.isfinite(condition) or condition < 1:
        raise ValueError(f"condition: must be a finite number >= 1, got {condition}")
    i = np.arange(1, dim + 1, dtype=np.float64)
    if spectrum == "flat" or dim == 1:
        return np.ones(dim)
    if spectrum == "geometric":
        return condition ** (-(i - 1) / (dim - 1))
    return i ** (-np.log(condition) / np.log(dim))


def gaussian_problem(
    dim: int = 10,
    *,
    spectrum: str = "geometric",
    condition: float = 100.0,
    noise: float = 0.5,
) -> GaussianLinearRegression:
    """Least squares with Gaussian features (docs/theory.md §5.1): ``a ~ N(0, diag(lam))`` with ``lam`` from
    :func:`gaussian_spectrum`, ``y = a . x_star + e``, ``e ~ N(0, noise)``, ``x_star`` the vector
    with every entry ``1 / sqrt(d)`` (equal initial error in every eigendirection, ``|x_star| = 1``)
    and ``x0 = 0``. Deterministic: no random numbers are drawn.

    Raises:
        ValueError: naming the argument (see :func:`gaussian_spectrum`; ``noise`` must be a finite
            number ``>= 0``).
    """
    lam = gaussian_spectrum(dim, spectrum=spectrum, condition=condition)
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: must be a finite number >= 0, got {noise}")
    x_star = np.full(dim, 1.0 / np.sqrt(dim))
    return GaussianLinearRegression(np.diag(lam), x_star, np.zeros(dim), noise)


# ------------------------------------------------------------------------------------------------
# CSV files
# ------------------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_row(fields: list[str], line: int) -> list[float] | None:
    """The floats of one CSV row; None when a non-empty field is not a number (a header line or
    an error, the caller decides)."""
    texts = [f.strip() for f in fields]
    values = [_number(t) for t in texts]
    if any(v is None and t for v, t in zip(values, texts, strict=True)):
        return None
    for col, (v, t) in enumerate(zip(values, texts, strict=True), start=1):
        if v is None:
            raise ValueError(f"line {line}, column {col}: empty field")
        if not np.isfinite(v):
            raise ValueError(f"line {line}, column {col}: value {t!r} is not finite")
    return values


def load_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a numeric CSV file whose last column is the target.

    Comma-separated; an optional header line (a first line with a non-numeric field) is skipped;
    blank lines are ignored. Every other line must have the same number of fields, all finite
    numbers.

    Args:
        path: path of the file.

    Returns:
        ``(features, targets)``: ``(n, d)`` and ``(n,)`` float64 NumPy arrays (not standardised).

    Raises:
        ValueError: starting with the path, for a missing or unreadable file, a non-numeric, empty
            or non-finite field (with its line and column), rows of different lengths, fewer than
            2 columns or fewer than 2 data rows.
    """
    import csv
    import os

    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh))
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: is a directory, not a CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{name}: cannot read it ({e.__class__.__name__}: {e})") from None
    rows, width = [], None
    for line, fields in enumerate(lines, start=1):
        if not fields or all(not f.strip() for f in fields):
            continue
        try:
            values = _parse_row(fields, line)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if values is None:
            if width is None and not rows:  # a header line
                width = len(fields)
                continue
            col, text = next(
                (c, f.strip())
                for c, f in enumerate(fields, start=1)
                if f.strip() and _number(f.strip()) is None
            )
            raise ValueError(f"{name}: line {line}, column {col}: {text!r} is not a number")
        if width is None:
            width = len(values)
        if len(values) != width:
            raise ValueError(f"{name}: line {line} has {len(values)} fields, expected {width}")
        rows.append(values)
    if width is not None and width < 2:
        raise ValueError(f"{name}: need at least 2 columns (features, then the target), got {width}")
    if len(rows) < 2:
        raise ValueError(f"{name}: need at least 2 data rows, got {len(rows)}")
    data = np.asarray(rows, dtype=np.float64)
    return data[:, :-1], data[:, -1]


def csv_problem(path) -> LinearRegressionData:
    """Least squares on a CSV file (last column the target, see :func:`load_csv`), features and
    target standardised (:func:`standardise`), ``x0 = 0``, sampling with replacement (docs/theory.md §5.3).

    Raises:
        ValueError: as :func:`load_csv`, or when the target column is constant (nothing to fit).
    """
    X, y = load_csv(path)
    if np.ptp(y) == 0:
        import os

        raise ValueError(f"{os.fspath(path)}: the target (last column) is constant")
    return LinearRegressionData(standardise(X), standardise(y[:, None])[:, 0], np.zeros(X.shape[1]))
