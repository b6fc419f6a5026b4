"""Pictures of a model for people: the hook map (terminal tree and standalone HTML)."""

from flex_surgery.viz.hook_map import HookInfo, HookMap, ModuleNode, ParamInfo, hook_map

__all__ = ["HookInfo", "HookMap", "ModuleNode", "ParamInfo", "hook_map"]
