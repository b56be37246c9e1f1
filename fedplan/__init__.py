"""fedplan: a compiler-style memory planner for on-device and federated training.

    import fedplan
    planned = fedplan.compile(model, example_inputs, budget="512MB")

See the README for the pipeline (trace, measure, solve, rewrite) and the CLI.
"""

from fedplan.planner.budget import Budget
from fedplan.planner.plan import Plan
from fedplan.planner.solvers import SolverOptions, solver_names
from fedplan.runtime.rewrite import PlannedModule

from .analysis import Analysis, analyze
from .api import apply, compile, measure, plan
from .errors import (
    BadInputError,
    BudgetInfeasibleError,
    FedplanError,
    ModelFileError,
    PlanMismatchError,
    SolverError,
    TraceError,
)
from .units import format_bytes, parse_size

__all__ = [
    "Analysis", "Budget", "Plan", "PlannedModule", "SolverOptions", "analyze", "apply",
    "compile", "measure", "plan", "solver_names", "parse_size", "format_bytes",
    "FedplanError", "BadInputError", "BudgetInfeasibleError", "ModelFileError",
    "PlanMismatchError", "SolverError", "TraceError",
]
__version__ = "0.1.0"
