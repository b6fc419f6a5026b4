"""The planner's one error type: bad input, or a plan that does not fit its budget."""


class PlanError(ValueError):
    """The model, mesh, tokens or store cannot be planned, or the plan exceeds its budget."""
