"""Results of a sweep: :class:`SweepOutputs` (the traced per-configuration outputs of
:func:`jaxsched.sweep_core`), :class:`SweepResult` (the host-side table of :func:`jaxsched.sweep`),
reading them back (:func:`load_results`, :func:`load_sweep`) and the chunk files they come from."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
import zipfile
from typing import Any

import equinox as eqx
import numpy as np

from .._misc import atomic_write
from .._solution import RESULTS
from .._types import Array, Float, Int
from .configs import Configurations, host_checks, problem_params
from .status import KEEPS_NUMBERS, KEEPS_SOLVER_CODE, SweepStatus, reason, to_results

__all__ = ["SweepOutputs", "SweepResult", "load_results", "load_sweep"]


class SweepOutputs(eqx.Module):
    """Per-configuration outputs of :func:`sweep_core` (leading axis: configurations).

    Schedules: ``batch_sizes`` (the exact integer optimum), ``beta`` (the relaxed optimum),
    ``phi``. Losses (theory 3): ``predicted_loss`` of ``batch_sizes``, ``constant_loss`` of the
    constant real schedule ``samples / steps``, ``base_loss = F(x_T)``, ``correction``; noise terms
    ``objective``, ``relaxed_objective``, ``constant_objective`` (``sum_k phi_k w(b_k)``);
    ``gain = constant_objective / objective`` (noise-induced excess, constant over optimal).
    Exact (quadratic problems with ``exact=True``, else ``None``): ``exact_loss``,
    ``exact_constant_loss``, ``exact_gd_loss`` (plain gradient descent) and ``exact_gain =
    (exact_constant_loss - exact_gd_loss) / (exact_loss - exact_gd_loss)``.
    ``status`` (:class:`SweepStatus`, 0 = success), ``result`` (the :class:`jaxsched.RESULTS` code
    of the status: ``RESULTS[...]`` reads it) and ``solver_result`` (the ODE solver's code).
    Every number of a failed configuration is 0.

    Adam / RMSprop sweeps (``optimizer=``, docs/theory.md §9: the moment model, no sensitivity)
    have no ``phi``, ``correction``, ``objective``, ``relaxed_objective``, ``constant_objective``
    or exact losses: those fields are ``None`` (absent from the result table), never filled in.
    Their losses are the moment model's ``E F(x_K)``: ``predicted_loss`` of ``batch_sizes``,
    ``relaxed_loss`` of ``beta``, ``constant_loss`` of ``samples / steps``; ``base_loss`` is
    ``F(x̄_K)`` of the optimum's mean path and ``noise_term`` / ``constant_noise_term`` are
    ``tr(hess F P_xx) / 2`` of the optimum / the constant schedule; ``gain = (constant_loss -
    loss_floor) / (predicted_loss - loss_floor)``, the convention of
    :attr:`jaxsched.AdaptiveSchedule.gains` (> 1: the optimum is better); ``iterations`` counts
    L-BFGS iterations and ``solver_result`` holds L-BFGS's ``RESULTS`` code.
    """

    batch_sizes: Int[Array, "n steps"]
    beta: Float[Array, "n steps"]
    phi: Float[Array, "n steps"] | None = eqx.field(default=None, kw_only=True)
    predicted_loss: Float[Array, " n"]
    constant_loss: Float[Array, " n"]
    base_loss: Float[Array, " n"]
    correction: Float[Array, " n"] | None = eqx.field(default=None, kw_only=True)
    objective: Float[Array, " n"] | None = eqx.field(default=None, kw_only=True)
    relaxed_objective: Float[Array, " n"] | None = eqx.field(default=None, kw_only=True)
    constant_objective: Float[Array, " n"] | None = eqx.field(default=None, kw_only=True)
    gain: Float[Array, " n"]
    status: Int[Array, " n"]
    solver_result: Int[Array, " n"]
    result: Int[Array, " n"]
    exact_loss: Float[Array, " n"] | None = None
    exact_constant_loss: Float[Array, " n"] | None = None
    exact_gd_loss: Float[Array, " n"] | None = None
    exact_gain: Float[Array, " n"] | None = None
    relaxed_loss: Float[Array, " n"] | None = None
    noise_term: Float[Array, " n"] | None = None
    constant_noise_term: Float[Array, " n"] | None = None
    iterations: Int[Array, " n"] | None = None


SCALAR_OUTPUTS = (
    "predicted_loss", "constant_loss", "base_loss", "correction", "objective",
    "relaxed_objective", "constant_objective", "gain",
)
STEP_OUTPUTS = ("batch_sizes", "beta", "phi")
#: The outputs of an Adam / RMSprop sweep (see :class:`SweepOutputs`).
ADAPTIVE_SCALAR_OUTPUTS = (
    "predicted_loss", "constant_loss", "base_loss", "gain", "relaxed_loss", "noise_term",
    "constant_noise_term", "iterations",
)
ADAPTIVE_STEP_OUTPUTS = ("batch_sizes", "beta")


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Results of :func:`sweep`, one row per configuration (host-side NumPy arrays: a table with
    strings, not a pytree).

    Attributes:
        configs: the :class:`Configurations`.
        steps: ``(n,)`` steps of each configuration.
        outputs: ``name -> array``: ``batch_sizes``, ``beta``, ``phi`` as ``(n, max_steps)``
            (entries past a configuration's ``steps`` are 0) and the scalar outputs of
            :class:`SweepOutputs` as ``(n,)``. Failed rows hold zeros, never NaN (an Adam /
            RMSprop row at ``MAX_ITERATIONS`` keeps its numbers, see ``KEEPS_NUMBERS``).
        status: ``(n,)`` :class:`SweepStatus` codes; ``reason``: ``(n,)`` text ("" when ok).
        result: ``(n,)`` :class:`jaxsched.RESULTS` codes of the statuses (``RESULTS.successful``
            is 0; a solver failure keeps the solver's code; ``-1``: not computed yet). Derived from
            ``status`` and ``reason`` when not given.
    """

    configs: Configurations
    steps: np.ndarray
    outputs: dict[str, np.ndarray]
    status: np.ndarray
    reason: np.ndarray
    result: np.ndarray | None = None

    def __post_init__(self):
        if self.result is None:
            object.__setattr__(self, "result", _results_from_reasons(self.status, self.reason))

    def message(self, i: int) -> str:
        """The :class:`jaxsched.RESULTS` message of configuration ``i`` ("" when it succeeded)."""
        code = int(self.result[i])
        return "not computed yet" if code < 0 else RESULTS._index_to_message[code]

    def plot(self, value: str = "gain", ax=None, *, axes=None, step: int | None = None,
             cmap: str = "viridis", title: str | None = None):
        """A heatmap of output ``value`` over the two widest grid axes (see
        :func:`jaxsched._sweep.plot.plot`); returns the matplotlib ``Axes``."""
        from .plot import plot

        return plot(self, value, ax=ax, axes=axes, step=step, cmap=cmap, title=title)

    @property
    def ok(self) -> np.ndarray:
        return self.status == SweepStatus.OK

    def __len__(self) -> int:
        return len(self.status)

    def __getattr__(self, name):
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(name)

    def on_grid(self, name: str) -> np.ndarray:
        """Output ``name`` reshaped to the grid (``configs.shape`` plus any trailing axes)."""
        arr = self.outputs[name]
        return arr.reshape(self.configs.shape + arr.shape[1:])

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as flat NumPy arrays (the content of ``results.npz``)."""
        out = {f"config_{k}": v for k, v in self.configs.columns.items()}
        if self.configs.axes is not None:
            out.update({f"axis_{k}": v for k, v in self.configs.axes.items()})
            out.update({f"coord_{k}": v for k, v in self.configs.coords.items()})
        out.update(self.outputs)
        out.update(steps=self.steps, status=self.status, reason=self.reason.astype(str),
                   result=self.result)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per configuration: scalar configuration values (array-valued ones by their
        grid index), status, reason, scalar outputs (empty for failed rows, those not in
        :data:`KEEPS_NUMBERS`) and the batch sizes as a space-separated string."""
        cols = self.configs.columns
        keep = np.isin(self.status, KEEPS_NUMBERS)
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {"index": i}
            for k, v in cols.items():
                if v.ndim == 1:
                    row[k] = v[i].item()
                elif self.configs.coords is not None:
                    row[f"{k}_index"] = int(self.configs.coords[k][i])
            row["steps"] = int(self.steps[i])
            row["ok"] = bool(self.ok[i])
            row["status"] = int(self.status[i])
            row["reason"] = str(self.reason[i])
            for k, v in self.outputs.items():
                if v.ndim == 1:
                    row[k] = v[i].item() if keep[i] else ""
            b = self.outputs["batch_sizes"][i, : self.steps[i]]
            row["batch_sizes"] = " ".join(map(str, b.tolist())) if keep[i] else ""
            rows.append(row)
        return rows

    def to_csv(self, path=None) -> str:
        """The table as CSV (written atomically to ``path`` when given); returns the text."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
        if path is not None:
            atomic_write(os.fspath(path), lambda f: f.write(text.encode()))
        return text

    def save(self, path) -> None:
        """All arrays to an ``.npz`` file (atomically); :func:`load_results` reads it back."""
        atomic_write(os.fspath(path), lambda f: np.savez(f, **self.arrays()))


def load_results(path) -> SweepResult:
    """Read a :class:`SweepResult` back from :meth:`SweepResult.save`'s ``.npz``.

    Raises:
        ValueError: naming the file, when it is not a readable results file.
    """
    data = read_npz(os.fspath(path))
    if data is None or "status" not in data:
        raise ValueError(f"path: {os.fspath(path)!r} is not a readable sweep results file")
    skip = ("config_", "axis_", "coord_")
    outputs = {k: v for k, v in data.items()
               if not k.startswith(skip) and k not in ("steps", "status", "reason", "result")}
    return SweepResult(_configs_from(data), data["steps"], outputs,
                       data["status"], data["reason"].astype(object), data.get("result"))




def _results_from_reasons(status, reasons) -> np.ndarray:
    """RESULTS codes from statuses; a solver failure's code is recovered from its message."""
    status = np.asarray(status)
    solver = np.zeros(status.shape, np.int64)
    messages = RESULTS._index_to_message
    for code, prefix in KEEPS_SOLVER_CODE.items():
        for i in np.flatnonzero(status == code):
            text = str(reasons[i]).removeprefix(prefix)
            solver[i] = (messages.index(text) if text in messages
                         else int(RESULTS.internal_error._value))
    return to_results(status, solver)


# ------------------------------------------------------------------------------------------------
# chunk files and assembling a table from them


def read_npz(path: str) -> dict[str, np.ndarray] | None:
    """All arrays of an ``.npz`` file, or ``None`` when it is missing, truncated or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def load_chunk(path: str, expected_index: np.ndarray | None = None, *, notice=None):
    """A finished chunk, or ``None`` when it is missing or unreadable or holds other configurations.

    An existing but unreadable file (truncated by a crash or a full disk, or not a chunk) is reported
    through ``notice(text)`` (default: one line on stderr) and then treated as missing."""
    if not os.path.exists(path):
        return None
    data = read_npz(path)
    if data is None or "index" not in data:
        text = f"sweep: chunk file {path} is unreadable; computing it again"
        (notice or (lambda t: print(t, file=sys.stderr)))(text)
        return None
    if expected_index is not None and not np.array_equal(data["index"], expected_index):
        return None
    return data


def assemble(cfg, cols, layout, finished, host_status, host_detail, *,
             adaptive: bool = False) -> SweepResult:
    """The table of all configurations from finished chunks (``layout``: ``(steps, name, members,
    size)`` per chunk) and the host-side statuses (``adaptive``: the outputs of an Adam / RMSprop
    sweep when nothing was computed)."""
    n = len(cfg)
    steps = cols["steps"].astype(np.int64)
    kmax = int(steps.max())
    status = host_status.copy()
    solver_result = np.zeros(n, np.int64)
    outputs: dict[str, np.ndarray] = {}
    for _, name, members, _ in layout:
        data = finished[name]
        computed = "status" in data
        for k, v in data.items():
            if k in ("index", "status", "solver_result", "result"):
                continue
            if k not in outputs:
                shape = (n, kmax) if k in STEP_OUTPUTS else (n,)
                outputs[k] = np.zeros(shape, v.dtype)
            if k in STEP_OUTPUTS:
                outputs[k][members, : v.shape[1]] = v
            else:
                outputs[k][members] = v
        if computed:
            core = data["status"]
            status[members] = np.where(host_status[members] != 0, host_status[members], core)
            solver_result[members] = data["solver_result"]
    failed = ~np.isin(status, KEEPS_NUMBERS)
    for v in outputs.values():
        v[failed] = 0  # host-rejected rows were computed on a stand-in configuration
    if not outputs:  # nothing was computed at all
        names = (ADAPTIVE_STEP_OUTPUTS + ADAPTIVE_SCALAR_OUTPUTS if adaptive
                 else STEP_OUTPUTS + SCALAR_OUTPUTS)
        outputs = {k: np.zeros((n, kmax) if k in STEP_OUTPUTS else (n,)) for k in names}
    reasons = np.array([reason(int(s), int(r), str(d))
                        for s, r, d in zip(status, solver_result, host_detail, strict=True)],
                       dtype=object)
    return SweepResult(cfg, steps, outputs, status, reasons, to_results(status, solver_result))


def _configs_from(data: dict[str, np.ndarray]) -> Configurations:
    cols = {k[7:]: v for k, v in data.items() if k.startswith("config_")}
    axes = {k[5:]: v for k, v in data.items() if k.startswith("axis_")} or None
    coords = {k[6:]: v for k, v in data.items() if k.startswith("coord_")} or None
    return Configurations(cols, axes, coords)


def load_sweep(results_dir) -> SweepResult:
    """The results of a (possibly unfinished) sweep from its folder: ``results.npz`` when the sweep
    finished, else the finished chunks (unfinished configurations, and those of unreadable chunks,
    get the status ``-1``, reason ``"not computed yet"``).

    Raises:
        ValueError: naming ``results_dir`` when it holds no sweep, or the file that is unreadable.
    """
    folder = os.fspath(results_dir)
    final = os.path.join(folder, "results.npz")
    if os.path.exists(final):
        return load_results(final)
    cfg_path = os.path.join(folder, "configs.npz")
    if not os.path.exists(cfg_path):
        raise ValueError(f"results_dir: no sweep in {folder!r}")
    data = read_npz(cfg_path)
    if data is None:
        raise ValueError(f"results_dir: {cfg_path!r} is unreadable; start the sweep again")
    cfg = _configs_from(data)
    cols = cfg.columns
    n = len(cfg)
    host_status, host_detail = host_checks(cols, problem_params(cols))
    layout, finished = [], {}
    pending = np.ones(n, bool)
    for name in sorted(os.listdir(folder)):
        if name.startswith("chunk-") and name.endswith(".npz"):
            chunk = load_chunk(os.path.join(folder, name))
            if chunk is None:
                continue
            layout.append((0, name, chunk["index"], 0))
            finished[name] = chunk
            pending[chunk["index"]] = False
    result = assemble(cfg, cols, layout, finished, host_status, host_detail)
    status = np.where(pending, -1, result.status)
    reasons = np.where(pending, "not computed yet", result.reason).astype(object)
    codes = np.where(pending, -1, result.result)
    return dataclasses.replace(result, status=status, reason=reasons, result=codes)
