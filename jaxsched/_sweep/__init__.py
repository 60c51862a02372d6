"""Sweep layer: grids of configurations through one compiled, vmapped and sharded call."""

from .core import (
    Configurations as Configurations,
    SweepOutputs as SweepOutputs,
    SweepResult as SweepResult,
    SweepStatus as SweepStatus,
    configurations as configurations,
    grid as grid,
    load_results as load_results,
    load_sweep as load_sweep,
    sweep as sweep,
    sweep_core as sweep_core,
)
