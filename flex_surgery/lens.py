"""The logit lens on sharded models: what each block's residual stream would predict.

For each chosen block ``i`` the lens takes the block's output ``h_i`` (the residual stream),
optionally passes it through a per-layer translator (``h + T_i(h)``, tuned-lens's
parametrisation, so an untrained zero translator is the identity), applies the model's final norm
and its unembedding, and keeps the ``top_k`` tokens and their log-probabilities at every
position. The last block's row is the model's own prediction.

How it runs on a sharded model -- every step reuses the machinery the hooks use:

* **Residuals** are read by a forward hook on each block that hands the output to the hooks'
  runtime (:meth:`~flex_surgery.parallel.runtime.Runtime.retrieve`, what a retrieval-only
  HookFunction calls) with ``store_on="all"``: every rank of the stage gets the whole residual
  (gathered over data parallelism; replicated over tensor parallelism, where block outputs
  already are). The lens has its own runtime, so the model may be wrapped by a FlexModel too.
* **Pipeline parallelism:** the residuals of each stage travel along the pipeline line with
  :func:`~flex_surgery.parallel.pipeline.collect_stage_outputs` (the stage traffic of
  :class:`~flex_surgery.parallel.pipeline.StageLink`), so the stage holding the head has all of
  them. Blocks are numbered globally (:class:`~flex_surgery.surgery.model_surgery.ModelSurgery`).
* **Vocabulary-parallel unembedding** (fairscale/Megatron ``ColumnParallelLinear`` or
  ``VocabParallelEmbedding`` heads, HF ``tp_plan`` ``lm_head`` with a ``Shard(0)`` DTensor
  weight): each tensor-parallel rank computes the logits of its vocabulary slice only (the
  registry's shard view of the weight), and the top-k is exact without gathering the
  vocabulary (:mod:`flex_surgery.lens_unembedding`). A replicated unembedding is split the same
  way, so the ranks share the work.
* **Data parallelism:** the head stage's replicas split the positions between them.
* The result reaches every rank with one all-reduce of the (small) top-k tables.

The lens is computed without autograd; translators are a hook point for a tuned lens (e.g.
``{i: tuned[i + 1]}`` for a ``tuned_lens.TunedLens``, whose index counts the embedding output).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.anatomy import MissingPart, locate, pipeline_flexmodel
from flex_surgery.lens_plot import plot_lens
from flex_surgery.lens_unembedding import (
    LensError,
    _local_unembedding,
    _Unembedding,
    local_topk,
    merge_topk,
)
from flex_surgery.naming import unwrap_model
from flex_surgery.parallel.runtime import HookSite, wait_for_host_copies
from flex_surgery.surgery.model_surgery import ModelSurgery

__all__ = ["LensError", "LensResult", "LogitLens", "logit_lens", "plot_lens"]


@dataclass
class LensResult:
    """Top-k predictions of the residual stream after each block.

    ``tokens[j]`` and ``logprobs[j]`` belong to block ``layers[j]`` (global index); their
    shape is the residual's leading dims (``[batch, seq]`` for Hugging Face models) then
    ``top_k``, best first.
    """

    layers: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.tokens.shape[-1]

    def top1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, probabilities)`` of the best token, shape ``[layers, *positions]``."""
        return self.tokens[..., 0], self.logprobs[..., 0].exp()

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, logprobs)`` of block ``layer`` (a global index present in ``layers``)."""
        return self.tokens[self.layers.index(layer)], self.logprobs[self.layers.index(layer)]


# -- the lens -----------------------------------------------------------------------------------
class LogitLens:
    """The logit lens of a (possibly sharded) model; build it once, run it many times.

    Args:
        model: the model, or this rank's pipeline stage / tensor-parallel shard of it
            (DDP / FSDP / FlexModel wrappers are looked through). Its architecture must be in
            :mod:`flex_surgery.anatomy` with an unembedding.
        layers: global block indices to read (negative counts from the end); default: all.
        top_k: how many tokens to keep per position.
        translators: ``{block index: module}``; the lens reads ``h + module(h)`` for that
            block (a tuned lens's affine translators). Must be identical on every rank.
        positions: only these positions of the sequence, e.g. ``[-1]``; default: all. The
            residuals keep the model's order -- ``[b, s, h]`` (HF), Megatron's ``[s, b, h]``
            -- and so does the result.
        tensor_parallel_size, pipeline_parallel_size, data_parallel_size, process_group: as
            for :class:`~flex_surgery.hooks.FlexModel` (the running groups are adopted).

    Collective: every rank of the model builds it, calls it, and closes it together.
    ``lens(*args, **kwargs)`` runs the model on the arguments and returns a
    :class:`LensResult` on every rank. Under pipeline parallelism run the pipeline step
    yourself (the lens's hooks record the residuals), then call :meth:`result` on every rank.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, top_k: int = 5,
                 *, translators: Mapping[int, nn.Module] | None = None,
                 positions: Sequence[int] | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 process_group: dist.ProcessGroup | None = None) -> None:
        from flex_surgery.parallel.distributed_runtime import build_runtime

        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        self.model = model
        self.top_k = top_k
        self.positions = None if positions is None else list(positions)
        root = unwrap_model(model)
        from flex_surgery.parallel import frameworks

        # the residuals' batch dim (1 for Megatron's [s, b, h]); the sequence is the other
        # leading dim: positions are picked there, micro-batches joined along the batch dim
        self._batch_dim = frameworks.batch_dim(root)
        self._located = locate(root)  # UnknownArchitecture: names the known ones
        # A stage wrapped by a FlexModel over pipeline stages: its pipeline is the lens's (the
        # same answer on every rank, before any collective).
        stage_of = pipeline_flexmodel(model)
        if stage_of is not None:
            pp = stage_of.runtime.mesh.pp_size
            if pipeline_parallel_size not in (1, pp):
                raise ValueError(f"pipeline_parallel_size={pipeline_parallel_size}, but the "
                                 f"model is a stage of a FlexModel over {pp} pipeline stages")
            pipeline_parallel_size = pp
        self._stored: dict[int, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        # The hooks' runtime (layouts, gathers) with store_on="all": every rank of a stage gets
        # the whole residual. Its own, not a FlexModel's, so a FlexModel may wrap the model too.
        self.runtime = build_runtime(root, tensor_parallel_size, pipeline_parallel_size,
                                     data_parallel_size, process_group, store_on="all")
        try:
            self.mesh = getattr(self.runtime, "mesh", None)
            self.group = process_group
            pp_group = self.mesh.group("pp") if self.mesh is not None and \
                self.mesh.pp_size > 1 else None
            self.surgery = ModelSurgery(root, pipeline_group=pp_group)
            self.layers, self.translators = self._agreed_choice(layers, translators or {})
            self._head_stage, self._norm, self._unembed = self._find_head()
            _, blocks = self.surgery.get_transformer_layers()
            for g in self.layers:
                if g in self.surgery.block_indices:
                    block = blocks[g - self.surgery.offset]
                    site = HookSite(f"{self.surgery.container}.{g - self.surgery.offset}",
                                    "forward", "output", module=block)
                    self._handles.append(block.register_forward_hook(self._tap(site, g)))
        except BaseException:
            self.close()
            raise

    # -- set-up ---------------------------------------------------------------------------------
    def _agreed_choice(self, layers: Sequence[int] | None,
                       translators: Mapping[int, nn.Module],
                       ) -> tuple[list[int], dict[int, nn.Module]]:
        """The blocks to read and their translators, checked so that every rank raises the
        same error or none does.

        A mistake only one rank makes (an index out of range, a translator for a block the lens
        does not read, one that is not a module, translators given on some ranks only or with
        other weights) would otherwise stop that rank alone while the others wait for it in
        the next collective. So each rank's local error and translator layout are exchanged
        first (one ``all_gather_object``, entered by every rank whatever it was given), then
        the weights are compared with the registry's
        :func:`~flex_surgery.parallel.frameworks.base.differs_across`."""
        from flex_surgery.parallel.frameworks.base import differs_across

        chosen, out, problem = [], {}, None
        try:
            chosen = self._local_choice(layers, translators, out)
        except (IndexError, ValueError, TypeError) as err:
            problem = err
        if self._world() == 1:
            if problem is not None:
                raise problem
            return chosen, out
        layout = [(i, [(name, tuple(p.shape), str(p.dtype)) for name, p in m.named_parameters()])
                  for i, m in sorted(out.items())]
        mine = (None if problem is None else (type(problem).__name__, str(problem)), layout)
        everyone: list[Any] = [None] * self._world()
        dist.all_gather_object(everyone, mine, group=self.group)
        for rank, (error, _) in enumerate(everyone):
            if error is not None:
                kind = {"IndexError": IndexError, "TypeError": TypeError}.get(error[0],
                                                                              ValueError)
                raise kind(f"on rank {rank}: {error[1]}")
        if any(theirs != layout for _, theirs in everyone) or any(differs_across(
                [p for _, m in sorted(out.items()) for p in m.parameters()], self.group)):
            raise LensError("translators differ across ranks; give every rank the same "
                            "translator weights (broadcast them first)")
        return chosen, out

    def _local_choice(self, layers: Sequence[int] | None, translators: Mapping[int, nn.Module],
                      out: dict[int, nn.Module]) -> list[int]:
        """This rank's checks of ``layers`` and ``translators`` (filled into ``out``, by global
        block index); the chosen global block indices."""
        n = self.surgery.num_layers
        given = list(range(n)) if layers is None else list(layers)
        for i in given:
            self.surgery._check_index(i)
        chosen = [i % n for i in given]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {given} name a block twice")
        for i, module in translators.items():
            self.surgery._check_index(i)
            if (i % n) not in chosen:
                raise ValueError(f"a translator is given for block {i}, which the lens does not "
                                 f"read (layers={chosen})")
            if not isinstance(module, nn.Module):
                raise TypeError(f"translator for block {i} must be an nn.Module, got "
                                f"{type(module).__name__}")
            out[i % n] = module
        return chosen

    def _world(self) -> int:
        return dist.get_world_size(self.group) if self.mesh is not None else 1

    def _find_head(self) -> tuple[int, nn.Module | None, _Unembedding | None]:
        """``(head stage, final norm, this rank's unembedding)``; the latter two only on the
        head stage. The stages agree on which holds the head (one gather under pipelining)."""
        loc = self._located
        if loc.anatomy.unembed is None:
            raise LensError(f"{loc.arch} has no unembedding in flex_surgery.anatomy, so the lens "
                            "has nothing to decode with; use a model with an LM head (e.g. "
                            "LlamaForCausalLM rather than LlamaModel) or register_anatomy(...) "
                            "with unembed=")
        try:
            unembed = loc.module("unembed")
        except MissingPart:
            unembed = None  # this pipeline stage does not hold the head
        norm, local, problem = None, None, None
        self._head_module, self._head_units = unembed, []
        if unembed is not None:
            try:
                if loc.anatomy.final_norm is not None:
                    norm = loc.module("final_norm")
                self._head_units = _fsdp2_units(loc.root, (unembed, norm))
                with _whole_parameters(self._head_units):  # the head FSDP2 shards over dp
                    local = _local_unembedding(unembed, self.mesh)
            except MissingPart as err:
                problem = (f"this stage holds {loc.name('unembed')} but not the final norm "
                           f"{loc.name('final_norm')}: {err}")
            except LensError as err:
                problem = str(err)
        # Every rank of the lens agrees on where the head is and on any error, so every rank
        # raises (or goes on) together: the stages of a pipeline, and the ranks of one stage
        # too -- ranks that should hold the same stage but do not (pipeline stages built
        # without pipeline_parallel_size) would otherwise have the head-less ones raise alone.
        mine = (self.surgery.stage, unembed is not None, problem)
        everyone = [mine]
        if self._world() > 1:
            everyone = [None] * self._world()
            dist.all_gather_object(everyone, mine, group=self.group)
        errors = [p for _, _, p in everyone if p]
        if errors:
            raise LensError(errors[0])
        has_head: dict[int, set[bool]] = {}
        for stage, has, _ in everyone:
            has_head.setdefault(stage, set()).add(has)
        split = sorted(s for s, seen in has_head.items() if len(seen) > 1)
        if split:
            ranks = [r for r, (s, has, _) in enumerate(everyone) if s in split and has]
            raise LensError(
                f"{loc.arch}: ranks of one pipeline stage disagree on holding the unembedding "
                f"{loc.name('unembed')} (ranks {ranks} hold it, the others of stage(s) {split} "
                "do not); if the model is split into pipeline stages, pass "
                "pipeline_parallel_size")
        holding = sorted(s for s, seen in has_head.items() if True in seen)
        if len(holding) != 1:
            raise LensError(f"{loc.arch}: the lens needs exactly one pipeline stage holding the "
                            f"unembedding {loc.name('unembed')}; stages holding it: {holding}")
        return holding[0], norm, local

    # -- running --------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> LensResult:
        """Run the model on ``args``/``kwargs`` and return the lens (every rank)."""
        if len(self.surgery.stage_sizes) > 1:
            raise LensError("under pipeline parallelism run the pipeline step yourself (the "
                            "lens records the residuals), then call result(link) on every rank")
        self.reset()
        with torch.no_grad():
            self.model(*args, **kwargs)
        return self.result()

    def _tap(self, site: HookSite, block: int) -> Callable[..., None]:
        """The forward hook of one block: the runtime stores the whole residual (as a
        retrieval-only HookFunction does), keyed by the block's global index."""
        from flex_surgery.hooks.unpack import unpack
        from flex_surgery.parallel.pipeline import is_metadata_pass

        store = self._stored.setdefault(block, [])
        graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if graph_task() != -1:  # activation checkpointing re-running the forward
                return
            tensor, _ = unpack(output, 0, site.module_name)
            if not is_metadata_pass(tensor):
                self.runtime.retrieve(tensor, site, store.append)

        return hook

    def reset(self) -> None:
        """Forget the residuals recorded so far."""
        for calls in self._stored.values():
            calls.clear()

    def result(self, link: Any = None) -> LensResult:
        """The lens of the residuals recorded since the last call (every rank calls it).

        ``link``: the :class:`~flex_surgery.parallel.pipeline.StageLink` of the pipeline step,
        so a failed stage raises instead of hanging; without one the mesh's pipeline group
        carries the residuals. Micro-batches recorded by several calls of a block are
        concatenated in call order along the batch dim.
        """
        from flex_surgery.parallel.pipeline import collect_stage_outputs

        wait_for_host_copies()  # device-to-host copies of the residuals have landed
        residuals = {str(g): [torch.cat(calls, dim=self._dims(calls[0])[0])]
                     for g, calls in self._stored.items() if calls}
        self.reset()
        if len(self.surgery.stage_sizes) > 1:
            collect_stage_outputs(residuals, self.mesh, "all", link)
        missing = [g for g in self.layers if not residuals.get(str(g))]
        if missing:
            raise LensError(f"blocks {missing} did not run since the last result (run the "
                            "model between results; a block removed by layer surgery has no "
                            "output)")
        hidden = [residuals[str(g)][0] for g in self.layers]
        if self.positions is not None:
            hidden = [h.movedim(self._dims(h)[1], -2)[..., self.positions, :]
                      .movedim(-2, self._dims(h)[1]) for h in hidden]
        lead = tuple(hidden[0].shape[:-1])
        if any(tuple(h.shape[:-1]) != lead for h in hidden):
            raise LensError(f"residuals of different shapes: {[tuple(h.shape) for h in hidden]}")
        return self._decode(hidden, lead)

    def _dims(self, h: torch.Tensor) -> tuple[int, int]:
        """``(batch dim, sequence dim)`` of a residual: the model's batch dim and the other
        leading dim of ``[., ., hidden]``; a ``[tokens, hidden]`` residual has only dim 0."""
        if h.ndim != 3:
            return 0, h.ndim - 2
        return self._batch_dim, 1 - self._batch_dim

    def _decode(self, hidden: list[torch.Tensor], lead: tuple[int, ...]) -> LensResult:
        """Top-k of every residual, assembled on every rank (see the module docstring)."""
        k, n_layers = self.top_k, len(self.layers)
        rows = math.prod(lead)
        mesh = self.mesh
        dp = mesh.dp_size if mesh is not None else 1
        dp_rank = mesh.rank("dp") if dp > 1 else 0
        start, count = _rows_of(rows, dp, dp_rank)
        table = torch.zeros(n_layers, rows, 2 * k, dtype=torch.float64)
        if self._unembed is not None:
            with self._whole_head():
                decoded = torch.cat([self._decoded_input(g, h.reshape(rows, -1)[start:start +
                                                                                 count])
                                     for g, h in zip(self.layers, hidden)])
                packed = self._local_topk(decoded).reshape(n_layers, count, 2 * k + 1)
            tokens, logprobs = self._merge(packed)
            tp_rank = mesh.rank("tp") if mesh is not None and mesh.tp_size > 1 else 0
            if tp_rank == 0:
                table[:, start:start + count, :k] = logprobs.double()
                table[:, start:start + count, k:] = tokens.double()
        if mesh is not None:
            dist.all_reduce(table, group=self.group)  # exactly one rank filled each row
        return LensResult(list(self.layers), table[..., k:].long().reshape(n_layers, *lead, k),
                          table[..., :k].float().reshape(n_layers, *lead, k))

    @contextlib.contextmanager
    def _whole_head(self) -> Iterator[None]:
        """The head and final norm with whole parameters while the lens decodes: FSDP2 units
        that shard them over the data-parallel ranks are unsharded (an all-gather over their
        mesh, every rank of the stage at the same point), and this rank's unembedding is read
        again from the whole weight; afterwards they are resharded as they were."""
        if not self._head_units:
            yield
            return
        with _whole_parameters(self._head_units):
            self._unembed = _local_unembedding(self._head_module, self.mesh)
            yield

    def _decoded_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """What the unembedding reads for block ``layer``: norm(h [+ translator(h)])."""
        u = self._unembed
        h = h.to(device=u.weight.device, dtype=u.weight.dtype)
        with torch.no_grad():
            translator = self.translators.get(layer)
            if translator is not None:
                h = h + translator(h)
            if self._norm is not None:
                h = self._norm.forward(h)  # no hooks: this is not a call of the model
        return h

    # Rows unembedded per matmul: every block's rows go through the same weight, so they are
    # decoded together (the weight is read once per chunk, not once per block), in chunks
    # whose logits stay under this many elements.
    CHUNK_ELEMENTS = 1 << 24

    def _local_topk(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's candidates for every row of ``h`` (:func:`local_topk`)."""
        return local_topk(self._unembed, h, self.top_k, self.CHUNK_ELEMENTS)

    def _merge(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k from every tensor-parallel rank's candidates (:func:`merge_topk`)."""
        return merge_topk(packed, self.top_k, self.mesh)

    def close(self) -> None:
        """Remove the lens's hooks (every rank)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.runtime.close()

    def __enter__(self) -> LogitLens:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception may be this rank's alone: its peers may be in their next collective on
        # the same groups, where close()'s barrier would meet their gathers. Remove the hooks
        # here and queue the groups (freed at the next point every rank reaches).
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.runtime.abandon()


def _fsdp2_units(root: nn.Module, modules: Sequence[nn.Module | None]) -> list[nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules) that manage the parameters of ``modules``:
    for each, the nearest of itself and its ancestors that is one. The same on every rank of a
    stage (the model's structure)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    names = {id(m): n for n, m in root.named_modules()}
    units: list[nn.Module] = []
    for module in modules:
        name = names.get(id(module)) if module is not None else None
        if name is None:
            continue
        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):
            candidate = root.get_submodule(".".join(parts[:depth]))
            if isinstance(candidate, FSDPModule):
                if all(candidate is not u for u in units):
                    units.append(candidate)
                break
    return units


@contextlib.contextmanager
def _whole_parameters(units: Sequence[nn.Module]) -> Iterator[None]:
    """FSDP2 ``units`` unsharded inside, resharded on the way out -- only those that were
    sharded (a root after its forward keeps its parameters whole, and stays so)."""
    resharded = []
    try:
        for unit in units:
            before = [id(p) for p in unit.parameters()]
            unit.unshard()
            if [id(p) for p in unit.parameters()] != before:
                resharded.append(unit)
        yield
    finally:
        for unit in resharded:
            unit.reshard()


def _rows_of(rows: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, count)`` of part ``index`` when ``rows`` are split into ``parts`` chunks."""
    from flex_surgery.parallel.layout import chunk_sizes

    sizes = chunk_sizes(rows, parts)
    return sum(sizes[:index]), sizes[index]


def logit_lens(model: nn.Module, inputs: Any, layers: Sequence[int] | None = None,
               top_k: int = 5, *, translators: Mapping[int, nn.Module] | None = None,
               positions: Sequence[int] | None = None, **parallel: Any) -> LensResult:
    """The logit lens of ``model`` on ``inputs`` (a dict of keyword arguments, a tuple of
    positional ones, or one tensor), on every rank. See :class:`LogitLens` for the arguments;
    build a :class:`LogitLens` to run it repeatedly or under pipeline parallelism."""
    with LogitLens(model, layers, top_k, translators=translators, positions=positions,
                   **parallel) as lens:
        if isinstance(inputs, Mapping):
            return lens(**inputs)
        if isinstance(inputs, tuple):
            return lens(*inputs)
        return lens(inputs)
