"""The small hierarchy of errors fedplan raises for things a user can fix.

Every message says what was expected, what was found and what to do. The CLI
prints ``str(error)`` on one line and exits with status 2; a raw traceback is
only ever a bug in fedplan.
"""

from __future__ import annotations


class FedplanError(Exception):
    """Base class of every error fedplan raises on user input."""


class BadInputError(FedplanError, ValueError):
    """A size, a file, an option or an argument is not what was expected."""


class ModelFileError(BadInputError):
    """A model file is missing, does not define the contract, or fails to run."""


class TraceError(FedplanError):
    """``torch.fx`` cannot follow the model; the message names module and construct."""


class BudgetInfeasibleError(FedplanError):
    """No plan in the plan space fits the budget.

    ``smallest_bytes`` is the smallest peak the plan space reaches (when known) and
    ``breakdown`` its composition, so the caller can say what would fit.
    """

    def __init__(self, message: str, *, smallest_bytes: int | None = None,
                 breakdown: dict[str, int] | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes
        self.breakdown = dict(breakdown or {})


class PlanMismatchError(BadInputError):
    """A plan was written for another model, batch size, optimizer or schema."""


class SolverError(FedplanError):
    """A solver failed in a way that is not the user's fault (model invalid, unknown status)."""
