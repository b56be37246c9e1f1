"""The error hierarchy (defined in ``fedplan.planner.errors`` so every layer can raise it)."""

from fedplan.planner.errors import (
    BadInputError,
    BudgetInfeasibleError,
    FedplanError,
    ModelFileError,
    PlanMismatchError,
    SolverError,
    TraceError,
)

__all__ = ["BadInputError", "BudgetInfeasibleError", "FedplanError", "ModelFileError",
           "PlanMismatchError", "SolverError", "TraceError"]
