"""Where retrieved activations go: the :class:`Store` protocol and its implementations.

``FlexModel(model, output_dict)`` keeps retrieved tensors in a dict in the storing rank's memory.
``FlexModel(model, None, store=...)`` hands each one to a store instead: :class:`MemoryStore`
(the same dict behind the protocol) or :class:`DiskStore` (safetensors files written by a
background thread, read back as one dataset from any process). See ``docs/store.md``.
"""

from flex_surgery.store.base import Store, StoreError, WriteMeta, model_fingerprint
from flex_surgery.store.disk import DiskStore
from flex_surgery.store.memory import MemoryStore
from flex_surgery.store.reduce import REDUCTIONS, resolve_reduce

__all__ = ["DiskStore", "MemoryStore", "REDUCTIONS", "Store", "StoreError", "WriteMeta",
           "model_fingerprint", "resolve_reduce"]
