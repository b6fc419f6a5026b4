"""Export once, then run the same program with other weights: injected, or swapped temporarily.

``torch.export`` turns a module into a graph plus a ``state_dict``; the graph does not care which
numbers sit in those tensors. So a fine-tuned checkpoint, or the weights of an eager model under
surgery, can be copied *in place* into the program's tensors instead of paying for a re-export
(seconds to minutes, and a recompile for compiled programs). This module is that copy, made
safe:

* the program owns its weights (``program.py`` exports a private copy; a program exported
  elsewhere gets copies of its own when wrapped), so injecting never writes into the eager model
  and editing the eager model never leaks into the program;
* every name, shape and dtype is checked before the first byte is written, and the write itself
  is :func:`~flex_surgery.export.inject.inject_weights`'s (one path for plain programs and this
  class), so a failed injection leaves the program untouched;
* tied weights are one tensor in the program and are written once;
* :meth:`ExportedModel.weights` swaps weights in for a ``with`` block and copies a snapshot back
  afterwards (:mod:`flex_surgery.surgery.snapshot`, as surgery does) -- bit-exact, never by
  subtracting a delta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

from flex_surgery.export.inject import (
    copy_matched,
    declare_owner,
    owns_weights,
    program_layout,
    write_weights,
)
from flex_surgery.export.layout import WeightSlot
from flex_surgery.export.program import OutputKey, export_private_copy, with_state
from flex_surgery.export.weight_files import load_weight_file, save_weight_file
from flex_surgery.files import write_atomically
from flex_surgery.naming import unwrap_model
from flex_surgery.surgery.snapshot import take_snapshot

__all__ = ["ExportedModel", "WeightSource", "live_weights"]

#: What :meth:`ExportedModel.inject` accepts: a state dict keyed by eager names, a module with
#: the same architecture (its live weights, see :func:`live_weights`), another ExportedModel of
#: it, or the path of a weight file (safetensors or ``torch.save``).
WeightSource = Union[Mapping[str, torch.Tensor], nn.Module, "ExportedModel", str, os.PathLike]

_META_FILE = "flex_surgery_export.json"
_META_VERSION = 1


class ExportedModel:
    """An ``ExportedProgram`` whose weights can be replaced without re-exporting.

    Build one with :meth:`export` (from an eager module) or :meth:`load` (from :meth:`save`).
    Call it like the eager module. Weight names are always the *eager* names
    (``transformer.h.0.attn.c_attn.weight``), whatever prefix the program uses internally.
    """

    def __init__(self, program: torch.export.ExportedProgram, prefix: str = "",
                 output: OutputKey = None):
        """Wrap ``program``; ``prefix`` is what its root put in front of the model's names.

        A program straight from ``torch.export.export`` shares its tensors with the exported
        module; unless it is known to own them (made by :meth:`export` or :meth:`load`) it is
        given copies of its own first, so injecting never writes into that module.
        """
        self.program = program
        self.output = output
        self.layout = program_layout(program, prefix)
        if not owns_weights(program):
            write_weights(program, self.layout, {}, strict=False)  # copies of its own
        self._runner = program.module()
        self._compiled: Any = None  # torch.compile'd module or AOTInductor runner
        self._kept: dict[str, torch.Tensor] = {}  # snapshot buffers of the last weights() block
        self._blocks: list[dict[str, bool]] = []  # the active weights() blocks, innermost last
        runner_state = _runner_state(self._runner)
        self._slots = {slot.names[0]: self._live_tensor(slot, runner_state)
                       for slot in self.layout.slots}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def export(cls, module: nn.Module, example_args: tuple = (),
               example_kwargs: Mapping[str, Any] | None = None, dynamic_shapes: Any = None,
               output: OutputKey = "logits", strict: bool = False) -> ExportedModel:
        """``torch.export`` a private copy of ``module``.

        ``output`` keeps only ``out[output]`` (``"logits"`` for Hugging Face language models;
        ``None`` keeps the whole output). ``dynamic_shapes`` is keyed by ``module.forward``'s
        argument names, as for ``torch.export.export``; ``strict`` is passed through.
        """
        program, prefix = export_private_copy(module, example_args, example_kwargs,
                                              dynamic_shapes, output, strict)
        return cls(program, prefix, output)

    def save(self, path: str | os.PathLike, weights: bool = True) -> None:
        """Write the program (``torch.export.save``, a ``.pt2`` file) with its current weights,
        or, with ``weights=False``, the graph alone: :meth:`load` then needs ``weights=``.

        Weightless files keep a large model's weights in one place (a checkpoint written by
        :meth:`save_weights` or by training) instead of one more copy inside every program.
        """
        meta = {"version": _META_VERSION, "prefix": self.layout.prefix, "output": self.output,
                "weights": weights}
        program = self.program
        if not weights:
            devices = {str(t.device) for t in self._slots.values()}
            if len(devices) != 1:
                raise ValueError(f"weights=False needs all weights on one device, not {devices}")
            meta.update(tied=self.tied, device=devices.pop())
            program = with_state(program, self._state_on("meta"))
        # A temporary name, renamed into place: a failed write leaves ``path`` as it was.
        write_atomically(path, lambda tmp: torch.export.save(
            program, tmp, extra_files={_META_FILE: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike, weights: WeightSource | None = None) -> ExportedModel:
        """Read a program written by :meth:`save`, then inject ``weights`` if given (required,
        and checked strictly, for a program saved with ``weights=False``)."""
        extra = {_META_FILE: ""}
        program = torch.export.load(path, extra_files=extra)
        declare_owner(program)  # its tensors were just read from the file: nobody else has them
        if not extra[_META_FILE]:
            raise ValueError(f"{os.fspath(path)!r} was not written by ExportedModel.save; wrap a "
                             f"torch.export.load result with ExportedModel(program, prefix=...)")
        meta = json.loads(extra[_META_FILE])
        if not meta["weights"]:
            if weights is None:
                raise ValueError(f"{os.fspath(path)!r} holds no weights (saved with "
                                 f"weights=False); pass weights= to load")
            program = _materialize(program, meta)
        exported = cls(program, meta["prefix"], meta["output"])
        if weights is not None:
            exported.inject(weights)
        return exported

    def __repr__(self) -> str:
        runner = "eager" if self._compiled is None else type(self._compiled).__name__
        return (f"ExportedModel({len(self.layout.slots)} weight tensors, "
                f"{len(self.tied)} tied group(s), output={self.output!r}, runner={runner})")

    # -- running ---------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runner = self._compiled if self._compiled is not None else self._runner
        return runner(*args, **kwargs)

    def compile(self, **compile_kwargs: Any) -> ExportedModel:
        """Run through ``torch.compile(program.module(), **compile_kwargs)`` from now on.

        The compiled code reads the same parameter tensors, so later injections take effect
        without recompiling (compiled kernels may differ from eager ones in the last bits).
        """
        self._compiled = torch.compile(self._runner, **compile_kwargs)
        return self

    def compile_aoti(self, package_path: str | os.PathLike | None = None,
                     **inductor_configs: Any) -> ExportedModel:
        """Compile ahead of time with AOTInductor and run through the compiled package from now on.

        The weights stay out of the compiled library (``aot_inductor.package_constants_in_so=
        False``) and the runner is pointed at the program's own tensors (``user_managed=True``),
        so :meth:`inject` and :meth:`weights` keep working with no extra copy and no recompile.
        Needs a C++ compiler (and the CUDA toolchain for a CUDA program); even a tiny model
        takes tens of seconds. The package is written to ``package_path`` (a temporary file when
        None) and holds no weights: load it with ``torch._inductor.aoti_load_package`` and give
        it weights with ``load_constants``, keyed by :meth:`name_map`'s program keys.
        """
        import tempfile

        if package_path is None:
            package_path = os.path.join(tempfile.mkdtemp(prefix="flex_surgery_aoti_"), "model.pt2")
        os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
        configs = {"aot_inductor.package_constants_in_so": False, **inductor_configs}
        path = torch._inductor.aoti_compile_and_package(
            self.program, package_path=os.fspath(package_path), inductor_configs=configs)
        runner = torch._inductor.aoti_load_package(path)
        live = {**self.program.constants, **self.program.state_dict}
        runner.load_constants({fqn: live[fqn] for fqn in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)
        self._compiled = runner
        return self

    # -- weights ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every eager weight name the program accepts, tied aliases included."""
        return self.layout.names

    @property
    def tied(self) -> list[tuple[str, ...]]:
        """Groups of eager names that share one tensor in the program."""
        return self.layout.tied

    def name_map(self) -> dict[str, str]:
        """``{eager name: program state key}``."""
        return self.layout.name_map()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The program's current weights under eager names (tied aliases included).

        The tensors are detached *live views*: ``clone()`` them to keep a snapshot.
        """
        return {name: self._slots[slot.names[0]].detach()
                for slot in self.layout.slots for name in slot.names}

    def inject(self, source: WeightSource, strict: bool = True) -> list[str]:
        """Copy new weights into the program in place; return the canonical names written.

        Everything is validated first (names, shapes, dtypes, tied copies agreeing), so on a
        :class:`~flex_surgery.export.layout.WeightMismatchError` the program is unchanged. With
        ``strict=False``, weights absent from ``source`` keep their current values; unexpected
        names are an error either way.
        """
        matched = write_weights(self.program, self.layout, self._weights_of(source), strict)
        return [slot.names[0] for slot, _ in matched]

    @contextmanager
    def weights(self, source: WeightSource, strict: bool = True,
                backup: str = "device") -> Iterator[ExportedModel]:
        """Run the program with ``source``'s weights inside the block, then restore bit-exactly.

        The tensors about to change are snapshotted (next to them, or on the CPU with
        ``backup="cpu"``), overwritten, and copied back on exit -- also when the block raises.
        Blocks nest; each restores what it found.

        The snapshot buffers are kept for the next block (one set, as large as the weights
        swapped: the memory a block needs anyway), so a loop of swaps costs three copies of the
        weights each time and no allocation; :meth:`release_snapshots` frees them.
        """
        matched = self.layout.match(self._weights_of(source), strict)
        names = [slot.names[0] for slot, _ in matched]
        kept = self._kept  # a nested block finds its outer block's buffers taken
        snapshots = [take_snapshot(self._slots[name], backup, kept.pop(name, None))
                     for name in names]
        block = {"superseded": False}
        self._blocks.append(block)
        try:
            copy_matched(self.program, self.layout, matched)
            yield self
        finally:
            at = next(i for i, b in enumerate(self._blocks) if b is block)
            later = self._blocks[at + 1:]
            del self._blocks[at]
            if not block["superseded"]:
                with torch.no_grad():
                    for snap in snapshots:
                        snap.restore()
            self._kept.update(zip(names, (snap.backup for snap in snapshots)))
            # Out of order: this block's snapshot is the state before it, blocks entered inside
            # it hold snapshots of states that are gone, so they restore nothing when they exit.
            for inner in later:
                inner["superseded"] = True
            if later or block["superseded"]:
                raise RuntimeError(
                    "weights() blocks exited out of order: "
                    + (f"{len(later)} block(s) entered inside this one are still active; the "
                       "weights from before this block are back, and those blocks will restore "
                       "nothing" if later else
                       "a block this one was entered inside has exited already and restored "
                       "the weights from before it; this one restores nothing"))

    def release_snapshots(self) -> None:
        """Free the snapshot buffers :meth:`weights` keeps between blocks."""
        self._kept = {}

    def save_weights(self, path: str | os.PathLike) -> None:
        """Write the current weights (one entry per tied group) to safetensors or a torch file."""
        save_weight_file({name: t for name, t in self._canonical_items()}, path)

    # -- internals -------------------------------------------------------------------------------
    def _live_tensor(self, slot: WeightSlot, runner_state: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
        """The tensor the runner reads for ``slot``; it must alias the program's own entry."""
        key = self.layout.program_key(slot.names[0])
        live = runner_state[key]
        stored = self.program.state_dict[key]
        if live.data_ptr() != stored.data_ptr():
            raise RuntimeError(f"program.module() copied {key!r} instead of sharing it with "
                               f"program.state_dict; in-place injection would be lost")
        return live

    def _state_on(self, device: str) -> dict[str, torch.Tensor]:
        """Program state keys -> new empty tensors on ``device``, one per slot (ties kept)."""
        state = {}
        for slot in self.layout.slots:
            empty = torch.empty(slot.shape, dtype=slot.dtype, device=device)
            state.update({self.layout.prefix + name: empty for name in slot.names})
        return state

    def _canonical_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for slot in self.layout.slots:
            yield slot.names[0], self._slots[slot.names[0]].detach()

    def _weights_of(self, source: WeightSource) -> Mapping[str, torch.Tensor]:
        """``source`` as a mapping of eager names to tensors."""
        if isinstance(source, ExportedModel):
            weights: Mapping[str, torch.Tensor] = source.state_dict()
        elif isinstance(source, nn.Module):
            weights = live_weights(unwrap_model(source))  # no DDP/FlexModel "module." prefix
        elif isinstance(source, (str, os.PathLike)):
            weights = load_weight_file(source)
        elif isinstance(source, Mapping):
            weights = source
        else:
            raise TypeError(f"cannot inject weights from a {type(source).__name__}; pass a state "
                            f"dict, a module or a weight file path")
        return weights


def _materialize(program: torch.export.ExportedProgram, meta: dict) -> torch.export.ExportedProgram:
    """Give a program saved without weights empty storage, tied names sharing one tensor.

    Its meta tensors carry shapes and dtypes but no identity, so ties come from ``meta``.
    """
    prefix, state = meta["prefix"], {}
    groups = {name: group for group in meta["tied"] for name in group}
    for key, old in program.state_dict.items():
        if key in state:
            continue
        empty = torch.empty(old.shape, dtype=old.dtype, device=meta["device"])
        for name in groups.get(key[len(prefix):], [key[len(prefix):]]):
            state[prefix + name] = empty
    program = with_state(program, state)
    declare_owner(program)
    return program


def live_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``module``'s forward computes with, under ``state_dict`` names.

    Parameters and persistent buffers, read directly rather than through ``state_dict()``:
    state-dict hooks may substitute other tensors (a :class:`~flex_surgery.surgery.SurgicalTheater`
    makes ``state_dict()`` return the *original* weights while it is active), whereas injecting a
    module means "make the program compute what this module computes now".
    """
    weights: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, param in sub.named_parameters(recurse=False):
            weights[dot + name] = param.detach()
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                weights[dot + name] = buf.detach()
    return weights


def _runner_state(runner: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(runner.named_parameters(remove_duplicate=False))
    state.update(runner.named_buffers(remove_duplicate=False))
    return state
