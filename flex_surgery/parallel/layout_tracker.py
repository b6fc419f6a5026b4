"""Which tensor-parallel layer produced a tensor: the run-time half of layout inference.

A module that no framework describes (a GELU, a norm, a whole block) takes the layout of the
output of the *innermost TP layer that produced it* -- the TP layer that ran last before the
module returned (``output``) or started (``input``). :class:`TPTracker` records that with
forward hooks; :class:`~flex_surgery.parallel.layout.LayoutInference` (which extends it) turns
it into layouts. See :mod:`flex_surgery.parallel.layout` for the rules.

"Ran last" is a matter of time, not of data flow: a module that runs between a column layer and
its row layer on a tensor that did not come out of the column layer (a hook point on the
residual, ``r = self.point(x)`` after ``h = up(x)``) is not split like ``up``'s output. Where the
tracker can see that -- the tensor *is* an input some TP layer took in this forward (the same
object, an alias of the same geometry, or, of a replicated input, all of its memory reshaped),
or a module took only such tensors and no TP layer ran inside it -- it describes the tensor by
how that layer took it instead (:meth:`TPTracker._through`): a fairscale or Megatron layer's
declared input layout; for a DTensor layer, what the DTensor its input hook made of it says
(:meth:`TPTracker._dtensor_input_was`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from flex_surgery.parallel import frameworks
from flex_surgery.parallel.frameworks.base import HIDDEN, ActivationShard, LayoutError, TPLayer
from flex_surgery.parallel.frameworks.dtensor import is_dtensor
from flex_surgery.parallel.layout_specs import ShardSpec, chunk_sizes
from flex_surgery.parallel.mesh import ParallelMesh

__all__ = ["TPTracker"]



# The keyword arguments that carry a model's batch, in the order they are looked for.
_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features",
                "hidden_states", "x", "input")


def _torch_batch_first(m: nn.Module) -> bool | None:
    """``batch_first`` of torch's own modules whose tensors are ``[seq, batch, ...]`` unless
    built with ``batch_first=True`` (``None``: not one of them). A Transformer layer keeps it
    on its attention, an encoder or decoder on its layers'."""
    if isinstance(m, (nn.MultiheadAttention, nn.RNNBase, nn.Transformer)):
        return bool(m.batch_first)
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(m.self_attn.batch_first)
    if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(m.layers):
        return _torch_batch_first(m.layers[0])
    return None


@dataclass(frozen=True)
class _Produced:
    """What the TP layer that ran last produced: its output's local shape and tp shard
    (``None``: replicated), or why its split is unknown.

    ``vouched`` (in the entry and exit tables only, not part of the identity): the module's
    first input (entry) or output (exit) was, in forward, the very tensor a TP layer made and
    described (:meth:`TPTracker.vouched`), so its gradient is that split's too, whatever its
    size."""

    shape: tuple[int, ...]
    spec: ShardSpec | None
    unknown: str | None = None
    vouched: bool = field(default=False, compare=False)


#: What :meth:`TPTracker._through` returns of a tensor no record describes, when asked so.
_UNRECORDED = _Produced((), None, "unrecorded")


def _split_of(state: _Produced | None) -> str:
    if state is None or (state.spec is None and state.unknown is None):
        return "replicated"
    if state.unknown is not None:
        return "with an unknown split"
    return f"split on dim {state.spec.dim} (shape {state.shape})"


def _tensors(*values) -> list[torch.Tensor]:
    """Every tensor in ``values``, however deep in tuples, lists and dicts (a module handed
    ``[h]`` takes ``h`` as much as one handed ``h``)."""
    found: list[torch.Tensor] = []
    for v in values:  # the usual cases without pytree (this runs on every module call)
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, tuple) and all(isinstance(a, torch.Tensor) for a in v):
            found.extend(v)
        elif isinstance(v, dict) and not v:
            continue
        else:
            found.extend(t for t in tree_leaves(v) if isinstance(t, torch.Tensor))
    return found


def _same_tensor(taken: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether ``t`` is the tensor a TP layer took, or an alias of it with the same shape,
    strides and start (``x.view(x.shape)``, ``x[:]``, ``x.detach()``): the same values, so the
    same split."""
    if taken is None:
        return False
    if taken is t:
        return True
    try:  # first what tells most tensors apart (this runs on every module call after a TP layer)
        if t.data_ptr() != taken.data_ptr():
            return False
    except (RuntimeError, NotImplementedError):  # no storage (DTensor, fake tensors)
        return False
    return not is_dtensor(t) and not is_dtensor(taken) and t.shape == taken.shape and \
        t.stride() == taken.stride() and t.dtype == taken.dtype and t.device == taken.device \
        and t.numel() > 0


def _reshaped(taken: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether ``t`` holds all of ``taken``'s memory, in order, in another shape (a reshape of
    a contiguous tensor): of a replicated tensor, replicated too."""
    if taken is None:
        return False
    try:
        if t.data_ptr() != taken.data_ptr():
            return False
    except (RuntimeError, NotImplementedError):  # no storage (DTensor, fake tensors)
        return False
    return not is_dtensor(t) and not is_dtensor(taken) and t.numel() == taken.numel() > 0 and \
        t.is_contiguous() and taken.is_contiguous() and t.dtype == taken.dtype and \
        t.device == taken.device


class _Taken:
    """A tensor a TP layer took, and how (``before``: ``None`` for replicated).

    Held weakly, and its geometry kept: a temporary alias the layer was handed
    (``up(x.view(x.shape))``) dies after the call while ``x`` lives on. While the storage's
    owner (the tensor, or the base it views) is alive, its memory cannot be reused, so a tensor
    at the same address with the same geometry is an alias: the same values, the same split."""

    __slots__ = ("_ref", "_owner", "_shape", "_stride", "_dtype", "_version", "before",
                 "by_layer")

    def __init__(self, taken: torch.Tensor, before: _Produced | None,
                 version: int | None = None, by_layer: bool = False) -> None:
        self._ref = weakref.ref(taken)
        base = taken._base
        self._owner = weakref.ref(base) if base is not None else None
        self._shape, self._stride, self._dtype = taken.shape, taken.stride(), taken.dtype
        self._version = version
        self.before = before
        self.by_layer = by_layer  # made by the TP layer whose description ``before`` is

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (at the taken tensor's address) is it or an alias of it -- or, taken
        replicated, all of its memory in another shape (a reshape). A record made with the
        memory's version counter (what a module returned, :meth:`TPTracker._keep_made`) holds
        nothing once the memory was written in place (``buf.copy_(piece)``, ``acc.add_(h)``,
        through any view: views share the counter): its values may be another split's."""
        if self._version is not None and t._version != self._version:
            return False
        return self._aliases(t)

    def is_(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is the recorded tensor itself (not an alias of it), or what torch
        hands a module with full backward hooks in its place (aliases made by its
        ``BackwardHookFunction``, whose input is, in the end, the recorded tensor itself)."""
        taken = self._ref()
        if taken is None:
            return False
        if taken is t:
            return True
        node, nr = t.grad_fn, t.output_nr
        if node is None or taken.grad_fn is None:
            return False
        hooked = False  # (an input alias, then an output alias of a module returning it)
        while node is not None and type(node).__name__ == "BackwardHookFunctionBackward":
            node, nr = node.next_functions[nr]
            hooked = True
        return hooked and node is taken.grad_fn and nr == taken.output_nr

    def written(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is the memory this record describes, written in place since."""
        return self._version is not None and t._version != self._version and self._aliases(t)

    def _aliases(self, t: torch.Tensor) -> bool:
        taken = self._ref()
        if taken is not None:
            return _same_tensor(taken, t) or self.before is None and _reshaped(taken, t)
        if self._owner is None or self._owner() is None or is_dtensor(t):
            return False
        if t.dtype != self._dtype:
            return False
        if t.shape == self._shape and t.stride() == self._stride:
            return True
        contiguous = self._stride == torch.empty(self._shape, device="meta").stride()
        return self.before is None and contiguous and t.is_contiguous() and \
            t.numel() == self._shape.numel() > 0


class TPTracker:
    """Remembers which tensor-parallel layer ran last, per module entry and exit, so a module
    without its own TP description inherits the split of what produced its tensor (the
    ``watch`` half of :class:`~flex_surgery.parallel.layout.LayoutInference`)."""

    def __init__(self, mesh: ParallelMesh, batch_dim: int = 0) -> None:
        self.mesh = mesh
        self.batch_dim = batch_dim
        self._tp: weakref.WeakKeyDictionary[nn.Module, TPLayer | None] = \
            weakref.WeakKeyDictionary()
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        # Modules whose activations have no known layout, and why (see ``watch``).
        self._unknown: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._undescribed: weakref.WeakKeyDictionary[nn.Module, str] = \
            weakref.WeakKeyDictionary()
        self._sequence_parallel = False
        # TP layers declared replicated whose last output did not keep its input's leading
        # dims, and what was seen (see ``_split_unseen``).
        self._split_elsewhere: weakref.WeakKeyDictionary[nn.Module, str] = \
            weakref.WeakKeyDictionary()
        # What the TP layer that ran last produced (None: no TP layer has run yet).
        self._current: _Produced | None = None
        self._entry: weakref.WeakKeyDictionary[nn.Module, _Produced | None] = \
            weakref.WeakKeyDictionary()
        self._exit: weakref.WeakKeyDictionary[nn.Module, _Produced | None] = \
            weakref.WeakKeyDictionary()
        # Per module: (the state when it was last entered, the state of its inputs then), for
        # an output computed from inputs that did not come out of the last TP layer.
        self._took: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        # The tensors TP layers took in this forward, by address (see _through).
        self._taken: dict[int, list[_Taken]] = {}
        # a DTensor TP layer's first argument before its input pre-hook made a DTensor of it
        self._raw_input: weakref.WeakKeyDictionary[nn.Module, weakref.ref | None] = \
            weakref.WeakKeyDictionary()
        # The watched models (entering one starts a forward), and the modules entered and left
        # since: a module called twice in one forward after tensors of different layouts has
        # no one entry (or exit) layout for its backward hooks.
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._entered: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._left: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list = []
        # Per module, (input, output) batch dims where the framework says they differ from
        # ``batch_dim``; and every parameter by identity (a layer may return one as an output).
        self._batch_dims: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = \
            weakref.WeakKeyDictionary()
        self._parameters: dict[int, tuple[weakref.ref, nn.Module]] = {}
        # Modules in (or being) one of torch's own with a batch_first setting: (its value,
        # which module).
        self._torch_seq: weakref.WeakKeyDictionary[nn.Module, tuple[bool, str]] = \
            weakref.WeakKeyDictionary()
        # Rows of this replica's input in the current forward (data parallelism; see
        # ShardSpec.rows), None before a watched model's forward or when it has no batch dim.
        self.input_rows: int | None = None

    # The tracker: remembers, per module, the TP layer output state at its entry and exit.
    def watch(self, model: nn.Module) -> None:
        """Track which TP layer ran last, so non-TP modules inherit its output layout.

        Collective over ``tp``: modules that no framework owns but whose parameters differ
        across the tp ranks are found here (one all-gather of fingerprints), and modules a
        framework splits but does not describe (``frameworks.undescribed_split_modules``);
        their activations, and those of modules after them, have no known layout.
        """
        frameworks.check_known_sharding(model)
        self._roots.add(model)
        for name, m in model.named_modules():
            self._names.setdefault(m, name)
            for p in m.parameters(recurse=False):
                self._parameters.setdefault(id(p), (weakref.ref(p), m))
        self._batch_dims.update(frameworks.batch_dims(model))
        for name, m in model.named_modules():
            batch_first = _torch_batch_first(m)
            if batch_first is not None and m not in self._torch_seq:
                for sub in m.modules():  # what runs inside has the same layout
                    self._torch_seq.setdefault(sub, (batch_first,
                                                     f"{name!r} ({type(m).__name__})"))
        if self.mesh.dp_size > 1:
            self._handles.append(model.register_forward_pre_hook(self._root_rows,
                                                                 with_kwargs=True))
        if self.mesh.tp_size == 1:
            return
        self._sequence_parallel = frameworks.sequence_parallel(model)
        self._tp.update(frameworks.tp_layers_within(model))
        for name, m in frameworks.split_unknown_modules(model, self.mesh.group("tp")).items():
            self._unknown[m] = name
        for name, m in frameworks.undescribed_split_modules(model, self.mesh).items():
            self._undescribed[m] = name
        for m in model.modules():
            info = self.tp_layer(m)
            if info is not None and not info.exact:  # a DTensor layer: see _dtensor_input_was
                self._handles.append(m.register_forward_pre_hook(self._record_raw_input,
                                                                 prepend=True))
            if info is not None or self._why_unknown(m) is not None:
                self._handles.append(m.register_forward_hook(self._tp_layer_ran))
            self._handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._leave))

    def unwatch(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _root_rows(self, module, args, kwargs) -> None:
        """Record the rows of this replica's input as a watched model's forward starts: the
        batch size of its first positional tensor, else of the first keyword among the usual
        input names (``input_ids``, ``inputs_embeds``, ``pixel_values``, ...), else the most
        among its keyword tensors of two dims or more.

        Not simply the first tensor: ``flex(position_ids=pos, input_ids=ids)`` puts a ``[1, s]``
        tensor first, and a table broadcast over the batch would then look like one row of it.
        Nor the most rows of all: an ``[s, s]`` mask beside a one-row input is no batch."""
        if torch._C._current_graph_task_id() != -1:
            return  # a forward recomputed in backward (checkpointing)
        dims = self._batch_dims.get(module)
        dim = self.batch_dim if dims is None else dims[0]
        named = [kwargs[k] for k in _INPUT_NAMES if isinstance(kwargs.get(k), torch.Tensor)]
        first = next((a for a in (*args, *named) if isinstance(a, torch.Tensor)), None)
        if first is None:  # keywords only, none of the usual names: the most rows among them
            wide = [a for a in kwargs.values() if isinstance(a, torch.Tensor) and a.ndim >= 2]
            first = max(wide, key=lambda a: a.shape[dim] if dim < a.ndim else 0, default=None)
        self.input_rows = first.shape[dim] if first is not None and \
            -first.ndim <= dim < first.ndim else None

    def _enter(self, module, args, kwargs):
        if torch._C._current_graph_task_id() != -1:
            return  # a forward recomputed in backward (checkpointing): keep the forward's
        if module in self._roots:  # a new forward: no TP layer of it has run yet
            self._current = None  # (not the last one of the previous forward)
            self._current = self._stage_input(module)
            self._entered.clear()
            self._left.clear()
            self._taken.clear()
            self._take_inputs(args, kwargs)
        took = self._state_of(self._current, args, kwargs)
        # the first argument as the module is entered, before later pre-hooks (an editing one,
        # a backward hook's wrapper) replace it: a TP layer's input is matched against this
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._took[module] = (self._current, took, None if first is None else weakref.ref(first))
        self._remember(self._entry, self._entered, module, "entered", self._vouching(took, args))
        why = self._why_unknown(module)
        info = self.tp_layer(module)
        if why is None and info is not None and info.opaque:
            why = "describes only its own input and output"
        if why is not None:
            # What runs inside it (an expert's activation, a norm) computes on its pieces,
            # whose split nothing says: not on what the last TP layer before it produced.
            shape = self._current.shape if self._current is not None else ()
            self._current = _Produced(shape, None, f"it runs inside {self._describe(module)}, "
                                                   f"which {why}")

    def _take_inputs(self, args: tuple, kwargs: dict) -> None:
        """The tensors the forward starts from keep the state it starts from (replicated: every
        tp rank is handed the same; a Megatron pipeline stage's input split on the sequence,
        :meth:`_stage_input`): a hook that sees one of them after a TP layer has run (a
        cross-attention memory, a mask handed down to a block) describes it so, not by the
        split of that layer's output when the shapes happen to match. Recorded like a tensor
        a layer took (:meth:`_through`); a DTensor says its own split."""
        self._keep_made((*args, *kwargs.values()), self._current)

    def _stage_input(self, module: nn.Module) -> _Produced | None:
        """A pipeline stage's forward starts from what the previous stage sent (Megatron's
        ``set_input_tensor``): split on the sequence under sequence parallelism."""
        entry = frameworks.stage_input(module)
        if entry is None:
            return None
        local, shard = entry
        try:
            spec = self._dim_shard(shard, local, True, module, "stage input")
        except LayoutError as exc:
            return _Produced(tuple(local.shape), None, str(exc))
        return _Produced(tuple(local.shape), spec)

    def _leave(self, module, args, output):
        if torch._C._current_graph_task_id() != -1:
            return
        state = self._state_of(self.output_state(module), output)
        # (whether a TP layer made it matters for one-token pieces: sequence parallelism only)
        self._keep_made(output, state, by_layer=self._sequence_parallel and
                        self.tp_layer(module) is not None)
        self._remember(self._exit, self._left, module, "left", self._vouching(state, output))

    def _vouching(self, state: _Produced | None, value) -> _Produced | None:
        """``state``, vouched for where every tensor of ``value`` is one a TP layer made and
        ``state`` describes it (see :meth:`vouched`): a backward hook may see the gradient of
        any of them. Under sequence parallelism only, where it is asked."""
        if not self._sequence_parallel or state is None or state.spec is None:
            return state
        tensors = _tensors(value)
        return replace(state, vouched=True) if tensors and \
            all(self.vouched(t, state) for t in tensors) else state

    def vouched(self, t: torch.Tensor, state: _Produced | None) -> bool:
        """Whether ``t`` is the very tensor a TP layer returned, unchanged since, and ``state``
        is how that layer described it: its split then holds whatever its size (one token per
        rank included, where a statistic over the sequence would have the piece's shape). The
        tensor itself, not an alias: ``y[:, :1]`` of a one-token piece has its every geometry,
        but the code that takes it means the first token of the whole sequence."""
        try:
            records = self._taken.get(t.data_ptr())
        except (RuntimeError, NotImplementedError):  # no storage (DTensor, fake tensors)
            return False
        # (another layer may have taken it since, with a record of its own: any record)
        return any(record.by_layer and record.is_(t) and record.holds(t) and
                   self._same_layout(record.before, state) for record in records or ())

    def _keep_made(self, output, state: _Produced | None, by_layer: bool = False) -> None:
        """Remember what describes the tensors a module returned, as they are made: a hook
        that sees one of them later in the forward, after another TP layer has run (an
        encoder's output handed to a cross-attention, a mask computed once and handed to
        every block), describes it so, not by the split of whatever TP layer ran last when
        the shapes happen to match (:meth:`_through`)."""
        for t in _tensors(output):
            if is_dtensor(t) or t.is_inference():  # (no version counter to see writes by)
                continue
            try:
                key = t.data_ptr()
            except (RuntimeError, NotImplementedError):  # no storage (fake tensors)
                continue
            records = self._taken.setdefault(key, [])
            # One that holds it already describes it: a tensor handed back beside another
            # (``(up(x), x)``) keeps its own description, not the one ``state`` settles on.
            if not any(record.holds(t) for record in records):
                records.append(_Taken(t, state, t._version, by_layer))

    def keep_like(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """Describe ``new`` as ``old`` is described (an editing hook's result, which the module
        returns in place of ``old``), where a record describes ``old``."""
        state = self._through(_UNRECORDED, old)
        if state is not _UNRECORDED and new is not old:
            # in place of a TP layer's own output, it is that layer's (see vouched)
            self._keep_made(new, state, by_layer=self.vouched(old, state))

    def _through(self, state: _Produced | None, t: torch.Tensor) -> _Produced | None:
        """The state that describes ``t``: ``state`` (what the TP layer that ran last
        produced), unless a TP layer took ``t`` in this forward (q, k and v in turn; a
        cross-attention's q took ``x`` and k, v another tensor; a layer called twice) -- then
        how that layer took it (the last one that did). Found by address: one dict lookup."""
        try:
            records = self._taken.get(t.data_ptr())
        except (RuntimeError, NotImplementedError):  # no storage (DTensor, fake tensors)
            return state
        written = None
        for record in reversed(records or ()):
            if record.holds(t):
                return record.before
            if written is None and record.written(t):
                written = record
        if written is not None and not self._same_layout(written.before, state):
            # Made with one split, written in place since (``buf.copy_(piece)``, an in-place op
            # outside any module), and the TP layer that ran last splits its output otherwise:
            # what it holds now cannot be told. (Where they agree, either describes it.)
            return _Produced(tuple(t.shape), None, (
                f"a tensor of shape {tuple(t.shape)} was written in place (an in-place op or a "
                f"copy into it) after a module made it {_split_of(written.before)}, and the "
                f"tensor-parallel layer that ran since made {_split_of(state)}"))
        return state

    def _state_of(self, state: _Produced | None, *values) -> _Produced | None:
        """The state that describes all the tensors among ``values`` by :meth:`_through`, where
        they agree on an earlier one; otherwise ``state`` (the rule of time)."""
        if not self._taken:
            return state  # nothing to look through (and no list to build: every module call)
        tensors = _tensors(*values)
        if not tensors:
            return state
        first = self._through(state, tensors[0])
        return first if all(self._through(state, t) is first for t in tensors[1:]) else state

    def output_state(self, module: nn.Module) -> _Produced | None:
        """The state describing ``module``'s output as it returns: what its inputs were
        described by when no TP layer ran inside it, else what the last TP layer produced."""
        current, took, _ = self._took.get(module, (None, None, None))
        return took if current is self._current and module in self._took else self._current

    def input_state(self, t: torch.Tensor) -> _Produced | None:
        """The state describing ``t``, an input a module is about to take."""
        return self._through(self._current, t)

    def _remember(self, table, seen, module: nn.Module, what: str,
                  state: _Produced | None) -> None:
        """Record the layout state at ``module``'s entry or exit, which its backward hooks
        read. Called again in the same forward with another state (a module shared by two
        places, say after a column and a row layer), it has none: its gradients' layout is
        unknown rather than the last call's."""
        if module in seen:
            before = table.get(module)
            if not self._same_layout(before, state):
                state = _Produced(
                    state.shape if state is not None else (), None,
                    f"{self._describe(module)} {what} more than once in one forward, after "
                    "tensors of different layouts, and a backward hook cannot tell which "
                    "call's gradient it sees")
            elif state is not None and state.vouched and not (before and before.vouched):
                state = replace(state, vouched=False)  # vouched for only if every call was
        else:
            seen.add(module)
        table[module] = state

    def _same_layout(self, a: _Produced | None, b: _Produced | None) -> bool:
        """Whether two states give a module's tensors the same layout: the same split (or
        both replicated); under sequence parallelism also the same shape, which that check
        reads (``_inherited``)."""
        if a is not None and b is not None and a.spec is not None and b.spec is not None \
                and (a.spec.sizes is None) != (b.spec.sizes is None):
            # The same split, its sizes known from one path (a look-through of what a layer
            # took) and to be exchanged on the other (a sequence piece): the same pieces.
            a, b = replace(a, spec=replace(a.spec, sizes=None)), \
                replace(b, spec=replace(b.spec, sizes=None))
        if self._sequence_parallel:
            return a == b

        def split(x: _Produced | None) -> tuple:  # None: no TP layer ran yet (replicated)
            return (None, None) if x is None else (x.spec, x.unknown)
        return split(a) == split(b)

    def _record_raw_input(self, module, args) -> None:
        """Before every other pre-hook of a DTensor TP layer (``parallelize_module``'s input
        hook turns the argument into a DTensor): the tensor the caller passed."""
        if torch._C._current_graph_task_id() != -1:
            return
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._raw_input[module] = None if first is None else weakref.ref(first)

    def _tp_layer_ran(self, module, args, output):
        self._produce(module, args, output)
        info = self.tp_layer(module)
        if info is not None and not info.exact:
            raw = self._raw_input.get(module)
            taken = raw() if raw is not None else None
            spec = self._dtensor_input_was(taken, args)
        else:
            entry = self._took.get(module)
            taken = entry[2]() if entry is not None and entry[2] is not None else None
            if info is None or taken is None or is_dtensor(taken):
                return  # only a layer that says how it takes its input is looked through
            try:
                spec = self._dim_shard(info.input, taken, True, module, "input")
            except LayoutError:
                return
        if spec is False:
            return
        before = None if spec is None else _Produced(tuple(taken.shape), spec)
        try:
            key = taken.data_ptr()
        except (RuntimeError, NotImplementedError):
            return
        self._taken.setdefault(key, []).append(_Taken(taken, before))

    def _dtensor_input_was(self, taken: torch.Tensor | None,
                           args: tuple) -> ShardSpec | None | bool:
        """How a DTensor TP layer's input hook took the plain tensor ``taken``: it made the
        DTensor the layer received (``args[0]``) from it with the layer's declared input
        layout, and a DTensor's shape is the whole one, so ``taken`` is replicated where the
        two shapes agree and this rank's tp piece where they differ in one dim by the piece's
        size. ``False`` where that is not certain (nothing looked through)."""
        received = args[0] if args else None
        if taken is None or is_dtensor(taken) or not is_dtensor(received) or \
                received.ndim != taken.ndim:
            return False
        whole = tuple(received.shape)
        differ = [d for d in range(taken.ndim) if taken.shape[d] != whole[d]]
        if not differ:
            return None
        if len(differ) > 1:
            return False
        dim = differ[0]
        sizes = chunk_sizes(whole[dim], self.mesh.tp_size)
        if taken.shape[dim] != sizes[self.mesh.rank("tp")]:
            return False
        return ShardSpec("tp", dim, sizes)

    def _produce(self, module, args, output):
        """Set ``_current`` to what the TP layer ``module`` produced."""
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor):
            self._current = None
            return
        if is_dtensor(out):
            # What follows takes the DTensor (described by its placements) -- or a plain tensor
            # the model makes of it (to_local(): a piece; full_tensor(): whole), which shapes
            # cannot tell apart. The layer's own input is still looked through.
            self._current = _Produced(tuple(out.shape), None,
                                      f"it comes after {self._describe(module)}, which returns "
                                      f"a DTensor: a plain tensor made of it (to_local() or "
                                      f"full_tensor()) has no split anything declares")
            return
        why = self._why_unknown(module)
        if why is not None:
            self._current = _Produced(tuple(out.shape), None,
                                      f"it comes from {self._describe(module)}, which {why}")
            return
        info = self.tp_layer(module)
        why = self._split_unseen(module, info, args, out)
        if why is not None:
            self._split_elsewhere[module] = why
            self._current = _Produced(tuple(out.shape), None, why)
            return
        self._split_elsewhere.pop(module, None)
        try:
            spec = self._dim_shard(info.output, out, info.exact, module, "output")
        except LayoutError as exc:  # raised for the hooks that depend on it, not the forward
            self._current = _Produced(tuple(out.shape), None, str(exc))
            return
        self._current = _Produced(tuple(out.shape), spec)

    def _split_unseen(self, module: nn.Module, info: TPLayer, args: tuple,
                      out: torch.Tensor) -> str | None:
        """Why the output of a TP layer declared replicated is not (``None``: nothing says
        so). Its weights' placements declare a Linear or Embedding replicated when its output
        is reduced -- but something may then split it again where no declared layout says so
        (a style's ``output_layouts=Shard(1)`` is read: ``frameworks.dtensor``) and the hook
        sees one rank's rows. A
        Linear keeps its input's leading dims and an Embedding adds one after its ids', so an
        output that does not is split on another dim."""
        if info.output is not None or info.exact or not args or \
                not isinstance(args[0], torch.Tensor):
            return None
        x = args[0].to_local() if is_dtensor(args[0]) else args[0]
        if isinstance(module, nn.Embedding):
            lead = tuple(x.shape)
        elif isinstance(module, nn.Linear):
            lead = tuple(x.shape[:-1])
        else:
            return None
        if tuple(out.shape[:-1]) == lead:
            return None
        return (f"it comes from {self._describe(module)}, whose weights say its output is "
                f"replicated, but it returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x.shape)}: the output is split on another dim (sequence "
                f"parallelism, output_layouts=Shard(...)?)")

    def _why_unknown(self, module: nn.Module) -> str | None:
        """Why the activations of ``module`` have no known layout, or ``None`` if they may."""
        if module in self._unknown:
            return ("holds parameters that differ across the tensor-parallel ranks but no "
                    "framework owns")
        if module in self._undescribed:
            framework = frameworks.owner(module)
            hint = (" (its ParallelStyle declares a partial sum, or a split on dim 0: "
                    "output_layouts=Partial() / Shard(0)?)") if framework.name == "dtensor" \
                else ""
            return (f"has parameters {framework.name} splits over the tensor-parallel ranks, "
                    f"but {framework.name} does not describe how a {type(module).__name__} "
                    f"splits its activations{hint}")
        return None

    def tp_layer(self, module: nn.Module) -> TPLayer | None:
        if module not in self._tp:
            self._tp[module] = frameworks.tp_layer(module, self.mesh)
        return self._tp[module]

    def _describe(self, module: nn.Module | None) -> str:
        if module is None:
            return "<unknown module>"
        name = self._names.get(module)
        return f"{name!r} ({type(module).__name__})" if name else type(module).__name__

    def _dim_shard(self, shard: ActivationShard | None, local: torch.Tensor, exact: bool,
                   module: nn.Module, role: str) -> ShardSpec | None:
        """The tp shard of ``local`` that ``shard`` describes, checked against its shape."""
        if shard is None or local.ndim == 0:
            return None
        dim = local.ndim - 1 if shard.dim == HIDDEN else shard.dim
        if dim >= local.ndim:
            return None
        tp, size = self.mesh.tp_size, local.shape[dim]
        if shard.full is None:  # equal shards (Megatron's sequence dim), or exchanged sizes
            if shard.sharded is False:
                return None
            return ShardSpec("tp", dim, None if shard.uneven else (size,) * tp,
                             blocks=shard.blocks)
        sizes = chunk_sizes(shard.full, tp)
        mine = sizes[self.mesh.rank("tp")]
        sharded = shard.sharded
        if sharded is None:  # decide from the observed shape
            sharded = size == mine and shard.full != mine
            if not sharded and exact and size != shard.full:
                raise LayoutError(
                    f"{self._describe(module)} {role}: dim {dim} has size {size}, neither the "
                    f"full {shard.full} nor this rank's tp shard {mine}")
        if not sharded:
            return None
        if size != mine:
            raise LayoutError(f"{self._describe(module)} {role}: local dim {dim} is {size}, "
                              f"not this rank's tp shard {mine} of {shard.full}")
        return ShardSpec("tp", dim, sizes, blocks=shard.blocks)
