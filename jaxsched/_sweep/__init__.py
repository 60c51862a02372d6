"""Sweep layer: grids of configurations through one compiled, vmapped and sharded call.

configs.py (configurations and host-side checks), core.py (the traced per-configuration work and
:func:`sweep_core`), results.py (outputs, result tables, reading them back), driver.py
(:func:`sweep`: chunks, results folder, fingerprint, resume), plot.py (heatmaps), status.py
(status categories mapped onto ``RESULTS``)."""

from .configs import (
    Configurations as Configurations,
    configurations as configurations,
    grid as grid,
)
from .core import sweep_core as sweep_core
from .driver import sweep as sweep
from .results import (
    SweepOutputs as SweepOutputs,
    SweepResult as SweepResult,
    load_results as load_results,
    load_sweep as load_sweep,
)
from .status import SweepStatus as SweepStatus
