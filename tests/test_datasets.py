"""The built-in data sets: the diabetes data read from scikit-learn's bundled files equals
scikit-learn's own loader after standardising, and reading it does not import scikit-learn (the
import is most of a short command's start-up)."""

import subprocess
import sys

import numpy as np

import jaxsched as js


def test_diabetes_data_equals_sklearn_loader():
    from sklearn.datasets import load_diabetes

    X, y = js.datasets.diabetes_data()
    X_ref, y_ref = load_diabetes(return_X_y=True)
    # load_diabetes rescales the raw columns (mean 0, norm 1); standardising undoes any positive
    # per-column affine map, so the two agree to float64 rounding of the rescaling (1e-15 level).
    np.testing.assert_allclose(X, js.datasets.standardise(X_ref), rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, js.datasets.standardise(y_ref[:, None])[:, 0], rtol=0, atol=1e-12)
    assert np.allclose(X.mean(axis=0), 0, atol=1e-12) and np.allclose(X.std(axis=0), 1, atol=1e-12)


def test_diabetes_data_does_not_import_sklearn():
    code = ("import sys, jaxsched.datasets as d; X, y = d.diabetes_data(); "
            "print(X.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(442,", "10)", "False"]
