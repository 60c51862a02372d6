"""jaxsched: optimal batch-size schedules for SGD from the O(h) expansion of its diffusion family."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

from . import datasets as datasets
from ._check.adaptive import simulate_adaptive as simulate_adaptive
from ._check.simulate import (
    SimulationResult as SimulationResult,
    simulate_sde as simulate_sde,
    simulate_sgd as simulate_sgd,
)
from ._control.adaptive import (
    AdaptiveSchedule as AdaptiveSchedule,
    adaptive_optimal_schedule as adaptive_optimal_schedule,
)
from ._control.allocation import (
    first_order_objective as first_order_objective,
    integer_optimum as integer_optimum,
    relaxed_optimum as relaxed_optimum,
)
from ._control.free_form import (
    free_form_batch_sizes as free_form_batch_sizes,
    free_form_init as free_form_init,
)
from ._control.joint import (
    JointSchedule as JointSchedule,
    StepsSamplesFront as StepsSamplesFront,
    joint_schedule as joint_schedule,
    largest_safe_lr as largest_safe_lr,
    practical_schedule as practical_schedule,
    steps_samples_front as steps_samples_front,
)
from ._control.optimal import (
    METHODS as METHODS,
    AbstractControl as AbstractControl,
    ClosedForm as ClosedForm,
    ExactDiscrete as ExactDiscrete,
    FirstOrderGradient as FirstOrderGradient,
    OptimalSchedule as OptimalSchedule,
    RefinedClosedForm as RefinedClosedForm,
    optimal_schedule as optimal_schedule,
)
from ._control.progress import (
    NoProgress as NoProgress,
    ProgressMeter as ProgressMeter,
    TqdmProgress as TqdmProgress,
)
from ._control.stages import compress_stages as compress_stages
from ._expansion.adaptive import (
    AdaptiveExpansion as AdaptiveExpansion,
    UntestedRangeWarning as UntestedRangeWarning,
    adaptive_expansion as adaptive_expansion,
    adaptive_expected_loss as adaptive_expected_loss,
)
from ._expansion.adjoint import DenseAdjoint as DenseAdjoint
from ._expansion.eigen import Eigenbasis as Eigenbasis, eigen_first_order_parts as eigen_first_order_parts
from ._expansion.matrix_free import (
    MatrixFree as MatrixFree,
    MatrixFreeSensitivity as MatrixFreeSensitivity,
    MemoryStats as MemoryStats,
    NegativeSensitivityReport as NegativeSensitivityReport,
    negative_sensitivity_report as negative_sensitivity_report,
    sensitivity_matrix_free as sensitivity_matrix_free,
)
from ._expansion.moments import Expansion as Expansion, expansion as expansion, expected_loss as expected_loss
from ._expansion.sensitivity import (
    AbstractSensitivity as AbstractSensitivity,
    FirstOrderParts as FirstOrderParts,
    first_order_parts as first_order_parts,
    sensitivity as sensitivity,
)
from ._optimizer import (
    SGD as SGD,
    AbstractAdaptiveOptimizer as AbstractAdaptiveOptimizer,
    AbstractOptimizer as AbstractOptimizer,
    Adam as Adam,
    RMSprop as RMSprop,
    lr_schedule as lr_schedule,
)
from ._problem.base import (
    AbstractFiniteDataProblem as AbstractFiniteDataProblem,
    AbstractOnlineProblem as AbstractOnlineProblem,
    AbstractProblem as AbstractProblem,
    AbstractQuadraticProblem as AbstractQuadraticProblem,
)
from ._problem.data import DataProblem as DataProblem
from ._problem.exact import (
    exact_expected_loss as exact_expected_loss,
    exact_gd_loss as exact_gd_loss,
    exact_loss_trajectory as exact_loss_trajectory,
    gaussian_correction as gaussian_correction,
    gaussian_gd_loss as gaussian_gd_loss,
    gaussian_phi as gaussian_phi,
    gaussian_sensitivity as gaussian_sensitivity,
)
from ._problem.general import Problem as Problem, SampledProblem as SampledProblem
from ._problem.linear import (
    DiagonalGaussianRegression as DiagonalGaussianRegression,
    GaussianLinearRegression as GaussianLinearRegression,
    LinearRegressionData as LinearRegressionData,
)
from ._problem.stability import stability_batch as stability_batch
from ._schedule.baselines import (
    constant_schedule as constant_schedule,
    linear_ramp as linear_ramp,
    round_to_budget as round_to_budget,
    schedule_fn as schedule_fn,
    step_doubling as step_doubling,
)
from ._schedule.export import (
    FORMATS as _EXPORT_FORMATS,
    BatchSchedule as BatchSchedule,
    ScheduleExport as ScheduleExport,
    export_schedule as export_schedule,
    schedule_json as schedule_json,
)
from ._solution import RESULTS as RESULTS, SolveError as SolveError
from ._sweep import (
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

try:
    __version__ = _version("jaxsched")
except _PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

EXPORT_FORMATS = _EXPORT_FORMATS  # the formats of js.export_schedule
