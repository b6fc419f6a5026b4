"""Plan what retrieving activations costs before running anything.

:func:`plan` computes, from a model config and the sizes of a parallel mesh, the bytes each
hooked activation gathers, moves over the network and stores per forward, per storing rank,
and each storing rank's peak host memory -- with the real activation shapes from a forward on
the meta device, without building the weights. ``python -m flex_surgery plan`` prints it, and
``FlexModel(..., memory_budget=...)`` refuses a plan that does not fit (:mod:`.budget`).
"""

from flex_surgery.plan.configs import BUILTIN_CONFIGS, load_config
from flex_surgery.plan.errors import PlanError
from flex_surgery.plan.mesh import MeshSizes, parse_bytes, parse_dtype, parse_mesh, parse_tokens
from flex_surgery.plan.planner import STORES, HookPlan, Plan, place_hooks, plan, plan_hooks
from flex_surgery.plan.shapes import HookShape, hook_shapes

__all__ = ["BUILTIN_CONFIGS", "STORES", "HookPlan", "HookShape", "MeshSizes", "Plan",
           "PlanError", "hook_shapes", "load_config", "parse_bytes", "parse_dtype", "parse_mesh",
           "parse_tokens", "place_hooks", "plan", "plan_hooks"]
