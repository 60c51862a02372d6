"""Pictures of a sweep: a heatmap of one output over two grid axes (matplotlib, no pyplot state)."""

from __future__ import annotations

import os

import numpy as np

from .._misc import atomic_write_files

__all__ = ["grid_values", "plot", "write_pngs"]

_LABELS = {
    "gain": "gain (constant / optimal noise term)",
    "exact_gain": "exact gain (excess loss, constant / optimal)",
    "first_batch": "first batch of the optimal schedule",
    "last_batch": "last batch of the optimal schedule",
}

#: The pictures ``jaxsched sweep`` writes: file name -> plotted value.
PICTURES = {"gain.png": "gain", "first_batch.png": "first_batch", "last_batch.png": "last_batch"}


def _values(result, value: str) -> np.ndarray:
    """``(n,)`` values of a scalar output, or of the first/last batch of each schedule."""
    if value in ("first_batch", "last_batch"):
        b = result.outputs["batch_sizes"]
        last = np.maximum(np.asarray(result.steps) - 1, 0)
        col = np.zeros(len(b), np.int64) if value == "first_batch" else last
        return b[np.arange(len(b)), col].astype(np.float64)
    if value not in result.outputs or result.outputs[value].ndim != 1:
        scalars = sorted(k for k, v in result.outputs.items() if v.ndim == 1)
        raise ValueError(
            f"value: expected one of {scalars + ['first_batch', 'last_batch']}, got {value!r}"
        )
    return result.outputs[value].astype(np.float64)


def _pick_axes(result, axes) -> tuple[str, ...]:
    grid = result.configs.axes
    if grid is None:
        raise ValueError("result: plotting needs a sweep over grid(...), not a list of configurations")
    names = list(grid)
    if axes is None:
        widest = sorted(names, key=lambda k: -len(grid[k]))[:2]
        return tuple(k for k in names if k in widest)  # grid order
    axes = tuple(axes)
    if not 1 <= len(axes) <= 2 or len(set(axes)) != len(axes) or any(a not in grid for a in axes):
        raise ValueError(f"axes: expected one or two distinct grid axes of {names}, got {axes!r}")
    return axes


def grid_values(result, value: str = "gain", *, axes=None):
    """The array a heatmap shows: output ``value`` on the grid, restricted to ``axes`` (default
    the two widest, in grid order) with every other axis at its first value; failed configurations
    are NaN. Returns ``(array, axes, fixed)`` with ``fixed`` the other axes' values."""
    names = _pick_axes(result, axes)
    grid = result.configs.axes
    full = np.where(result.ok, _values(result, value), np.nan).reshape(result.configs.shape)
    index = tuple(slice(None) if k in names else 0 for k in grid)
    array = full[index]
    order = [k for k in grid if k in names]
    if order != list(names):  # the caller asked for the axes in another order
        array = array.T
    fixed = {k: grid[k][0] for k in grid if k not in names}
    return array, names, fixed


def _ticks(values: np.ndarray) -> list[str]:
    if values.ndim > 1:  # an array-valued axis (a spectrum, a data subset): its index
        return [str(i) for i in range(len(values))]
    return [f"{v:g}" for v in values]


def plot(result, value: str = "gain", *, ax=None, axes=None, step=None, cmap: str = "viridis",
         title: str | None = None):
    """Draw a heatmap of ``value`` over two grid axes of a sweep.

    Args:
        result: a :class:`SweepResult` of a :func:`grid` sweep.
        value: a scalar output (``"gain"``, ``"exact_gain"``, ``"predicted_loss"``, ...) or
            ``"first_batch"`` / ``"last_batch"`` of the optimal schedule.
        ax: a matplotlib ``Axes`` to draw into (default: a new figure, without pyplot).
        axes: the one or two grid axes to show (rows, columns); default the two widest.
        step: unused (reserved for per-step pictures).
        cmap: colour map; failed configurations are grey.
        title: the title (default: what is shown and where the other axes are held).

    Returns:
        The ``Axes``; ``ax.images[0].get_array()`` is :func:`grid_values`'s array.

    Raises:
        ValueError: naming the argument, for an unknown ``value`` or ``axes``, or a result that is
            not a grid.
    """
    del step
    from matplotlib.figure import Figure

    array, names, fixed = grid_values(result, value, axes=axes)
    if array.ndim == 1:
        array = array[None, :]
        names = ("", names[0])
    if ax is None:
        ax = Figure(figsize=(1.2 + 0.7 * array.shape[1], 1.0 + 0.5 * array.shape[0]),
                    layout="constrained").add_subplot()
        ax.figure.set_size_inches(max(4.5, ax.figure.get_figwidth()),
                                  max(3.2, ax.figure.get_figheight()))
    masked = np.ma.masked_invalid(array)
    import matplotlib

    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.8")
    image = ax.imshow(masked, origin="lower", aspect="auto", cmap=colours,
                      interpolation="nearest")
    grid = result.configs.axes
    ax.set_xticks(range(array.shape[1]), _ticks(grid[names[1]]))
    ax.set_xlabel(names[1])
    if names[0]:
        ax.set_yticks(range(array.shape[0]), _ticks(grid[names[0]]))
        ax.set_ylabel(names[0])
    else:
        ax.set_yticks([])
    if array.size <= 144:  # small grids: the numbers themselves
        finite = array[np.isfinite(array)]
        mid = 0.5 * (finite.min() + finite.max()) if finite.size else 0.0
        for (i, j), v in np.ndenumerate(array):
            text = "failed" if not np.isfinite(v) else f"{v:.3g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(v) and v < mid else "black")
    ax.figure.colorbar(image, ax=ax, label=_LABELS.get(value, value))
    if title is None:
        title = _LABELS.get(value, value)
        if fixed:
            title += "\nat " + ", ".join(f"{k}={_ticks(np.asarray(v)[None])[0]}" if np.ndim(v) == 0
                                      else f"{k}[0]" for k, v in fixed.items())
    ax.set_title(title, fontsize=10)
    return ax


def write_pngs(result, folder: str, pictures: dict[str, str] | None = None) -> list[str]:
    """Write heatmaps (``file name -> value``, default :data:`PICTURES`) into ``folder``, all
    atomically (rendered with the Agg backend, mode ``0666 & ~umask``); returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    pictures = PICTURES if pictures is None else pictures
    writers = {}
    for name, value in pictures.items():
        ax = plot(result, value)
        FigureCanvasAgg(ax.figure)

        def write(path, fig=ax.figure):
            fig.savefig(path, format="png", dpi=120)

        writers[name] = write
    return atomic_write_files(os.fspath(folder), writers)
