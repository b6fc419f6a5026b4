"""One continuous-sparsification mask on one layer: shard-local mask parameters, how they are
turned into a mask (soft, hard, ablated, sampled), and how they multiply the live weight.

Why shard-local: a mask has one logit per weight, so a full-shape mask on every rank would cost
as much memory as the model. Each rank holds (and trains) the logits of the weights it holds;
the :class:`~flex_surgery.parallel.frameworks.views.LocalShard` of a weight says which elements
of the full weight those are (its *region*), and everything that must agree with the one-process
model is derived from that region:

- the L0 statistics are sums over the whole mask: each rank sums its part, ranks that hold the
  same region (data-parallel replicas, replicated biases) are counted once (a *leader* per
  region), and the parts are all-reduced;
- sampled ablations and random re-initialisations are drawn at the full shape from a generator
  seeded by (seed, layer, draw), exactly as one process would draw them, and each rank keeps
  its region of the draw;
- gradients reach the local logits through the framework's own autograd: a DTensor mask for
  DTensor TP, an all-gather whose backward averages over the data-parallel mesh for FSDP2 (the
  gradient FSDP itself would compute), and an all-reduce of the gradient where a neuron mask is
  replicated along a fairscale layer's partition dim.

The mask never writes the base weight: a forward pre-hook puts ``weight * mask`` in the
module's parameter slot for the duration of the module's forward, and a forward hook (run even
when the forward raises) puts the original object back.
"""

from __future__ import annotations

import collections
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.parallel.frameworks import tp_grad_partial_op
from flex_surgery.parallel.frameworks.views import BlockRegion, IndexRegion, LocalShard, Region
from flex_surgery.surgery.masks import hard_mask
from flex_surgery.surgery.theater import noise_seed

__all__ = ["ABLATIONS", "MASK_UNITS", "LayerMask", "hard_concrete_logit", "world_group"]

ABLATIONS = ("none", "zero_ablate", "random_ablate", "randomly_sampled", "complement_sampled")
MASK_UNITS = ("weight", "neuron")


# Hard concrete gates (Louizos et al., 2018, with NeuroSurgeon's constants): a concrete variable
# of temperature 2/3 stretched to (-0.1, 1.1) and clamped to [0, 1].
HC_TEMPERATURE, HC_LEFT, HC_RIGHT = 2 / 3, -0.1, 1.1
# Training forwards whose gates a recompute can still find, per masked parameter: more than the
# forwards a step runs before its backward (micro-batches accumulated, a pipeline's in flight).
GATE_DRAWS_REMEMBERED = 256


def hard_concrete_logit(open_share: float) -> float:
    """The initial gate logit that leaves about ``open_share`` of the gates open (NeuroSurgeon's
    ``log(p / (1 - p))``, ``p`` kept inside [0.0001, 0.9999])."""
    p = min(max(float(open_share), 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any number of values (torch's
    refuses inputs of more than 2**24 elements, a 70B model's layers hold more)."""
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def world_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The group of the ranks that hold the model: ``process_group``, by default every rank;
    ``None`` when that is one rank (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def neuron_dim(module: nn.Module) -> int:
    """The output-neuron dim of a target's weight: 1 for GPT-2's ``Conv1D`` (``[in, out]``),
    0 for every other supported layer (``[out, in, *kernel]``)."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _collapse(region: Region, keep: int, full_shape: torch.Size) -> Region:
    """The region of a neuron mask (size 1 on every dim but ``keep``) inside a weight region."""
    if isinstance(region, BlockRegion):
        return BlockRegion(
            tuple(o if d == keep else 0 for d, o in enumerate(region.offsets)),
            tuple(s if d == keep else 1 for d, s in enumerate(region.shape)))
    if isinstance(region, IndexRegion):
        return IndexRegion(tuple(i if d == keep else torch.zeros(1, dtype=torch.long)
                                 for d, i in enumerate(region.indices)))
    raise TypeError(f"region {type(region).__name__} cannot hold a mask")


def _region_key(region: Region) -> tuple:
    if isinstance(region, BlockRegion):
        return ("block", region.offsets, region.shape)
    return ("index", tuple(tuple(i.tolist()) for i in region.indices))


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward, gradient summed (or averaged) over ``group``: a mask replicated on
    every rank of a tensor-parallel group that multiplies a weight sharded over it, or a
    parameter its framework reduces after backward, gets a partial gradient on each rank
    (fairscale's ``copy_to_model_parallel_region``, for any group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, mean: bool = False
                ) -> torch.Tensor:
        ctx.group, ctx.mean = group, mean
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        if ctx.mean:
            grad = grad / dist.get_world_size(ctx.group)
        return grad, None, None


class StoredLayout(NamedTuple):
    """How a DTensor parameter is laid out -- what a mask needs of it, without the tensor (a
    parameter replaced later, e.g. by ``load_state_dict(assign=True)``, is not kept alive)."""

    device_mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]


def stored_layout(param: torch.Tensor | None) -> StoredLayout | None:
    from flex_surgery.parallel.frameworks import is_dtensor

    if param is None or not is_dtensor(param):
        return None
    return StoredLayout(param.device_mesh, tuple(param.placements), param.shape, param.stride())


@dataclass
class MaskedParam:
    """The mask of one parameter (``weight`` or ``bias``) of a target layer.

    ``logits`` are this rank's mask parameters; ``full_shape``/``region`` place them in the
    full mask (for a neuron mask the full shape is the weight's with 1 on every non-neuron dim);
    ``param_full_shape``/``param_region`` are the masked parameter's full shape and this rank's
    part of it, ``partition_dim`` the dim its framework splits over tensor-parallel ranks;
    ``stored`` is the layout of the parameter its framework keeps when that is a DTensor
    (FSDP2: the mask follows it while the forward computes with the unsharded weight);
    ``leader``
    says whether this rank counts its region in global sums (one rank per distinct region).

    No view of the weight's memory is kept: the weight is read from the layer when needed
    (magnitude pruning), so a moved, copied or reloaded model is ranked by its own weights.
    """

    pname: str
    logits: nn.Parameter
    full_shape: torch.Size
    region: Region
    param_full_shape: torch.Size
    param_region: Region
    partition_dim: int | None
    stored: StoredLayout | None
    tp_group: dist.ProcessGroup | None
    # The ranks that hold the model (CircuitModel's process_group; None: one process).
    group: dist.ProcessGroup | None = None
    # How the parameter's framework reduces its gradient over tp after backward ("sum" for
    # Megatron's sequence-parallel parameters, "avg", or None: whole on every rank); the
    # mask's gradient is reduced the same way.
    grad_partial: str | None = None
    leader: bool = True
    sampled: torch.Tensor | None = field(default=None, repr=False)
    random_values: torch.Tensor | None = field(default=None, repr=False)
    draws: int = 0
    resample: bool = False  # draw a new sampled mask at its next use (force_resample)
    noise_draws: int = 0  # hard concrete: the training masks drawn so far
    # The dtype the forward computes with when it is not the stored one (FSDP2's mixed
    # precision casts the shards to it): magnitudes are ranked in it, inside a forward or not.
    compute_dtype: torch.dtype | None = None
    # hard concrete: the draw of each recent training forward, by the state of torch's CPU
    # generator when it was drawn, for a recompute to find: (draw, whether a backward that
    # freed its graph has recomputed it), or None where two live forwards saw one state
    gate_draws: collections.OrderedDict[bytes, tuple[int, bool] | None] = field(
        default_factory=collections.OrderedDict, repr=False)

    @property
    def fan(self) -> int:
        """Weights covered by one mask element (the fan-in of a neuron; 1 for a weight mask)."""
        return math.prod(self.param_full_shape) // math.prod(self.full_shape)

    def flat_index(self) -> torch.Tensor:
        """Positions of the local logits in the flattened full mask."""
        full = torch.arange(math.prod(self.full_shape)).reshape(self.full_shape)
        return self.region.take(full).reshape(-1)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full mask from each rank's local part (collective; exact: one leader writes each
        element, every other rank adds zeros), in the local part's dtype, as in one process (a
        float64 logit below float32's range would otherwise turn 0 and change the count)."""
        group = self.group
        if group is None:
            return local.detach().reshape(self.full_shape).clone()
        full = torch.zeros(math.prod(self.full_shape), dtype=local.dtype, device=local.device)
        if self.leader:
            full[self.flat_index().to(local.device)] = local.detach().reshape(-1)
        dist.all_reduce(full, group=group)
        return full.reshape(self.full_shape)


def _generator(seed: int, name: str, draw: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(seed, name, draw))
    return gen


class LayerMask:
    """The continuous-sparsification or hard-concrete mask of one target layer (weight,
    optionally bias).

    Built by :class:`~flex_surgery.surgery.circuits.CircuitModel`; ``views`` are the layer's
    :class:`LocalShard` views by parameter name.
    """

    def __init__(self, name: str, module: nn.Module, views: dict[str, LocalShard], *,
                 mask_unit: str, mask_bias: bool, mask_init_value: float, seed: int,
                 tp_group: dist.ProcessGroup | None,
                 group: dist.ProcessGroup | None = None,
                 method: str = "continuous_sparsification",
                 prune_percentage: float = 0.0) -> None:
        self.name, self.module, self.seed, self.method = name, module, seed, method
        self.prune_percentage = prune_percentage
        self.mask_unit, self.mask_init_value = mask_unit, mask_init_value
        self.ablation = "none"
        self.use_masks = True
        self.force_resample = False
        self.params: dict[str, MaskedParam] = {}
        for pname in ("weight", "bias"):
            if pname not in views or (pname == "bias" and not mask_bias):
                continue
            view = views[pname]
            full_shape, region = view.full_shape, view.region
            if pname == "weight" and mask_unit == "neuron":
                keep = neuron_dim(module)
                full_shape = torch.Size(s if d == keep else 1 for d, s in enumerate(full_shape))
                region = _collapse(region, keep, view.full_shape)
            local_shape = tuple(region.take(torch.empty(full_shape, device="meta")).shape)
            logits = nn.Parameter(torch.full(local_shape, float(mask_init_value),
                                             dtype=view.local.dtype, device=view.local.device),
                                  requires_grad=method != "magnitude_pruning")
            partial = None
            if tp_group is not None and view.partition_dim is None and view.owners:
                partial = tp_grad_partial_op(module, view.owners[0], name)
            self.params[pname] = MaskedParam(
                pname, logits, full_shape, region, view.full_shape, view.region,
                view.partition_dim, stored_layout(view.owners[0] if view.owners else None),
                tp_group,
                group=group, grad_partial=partial)
        self.saved: list[dict[str, torch.Tensor]] = []  # the slots' own parameters, per call

    # -- masks -------------------------------------------------------------------------------
    def mask(self, pname: str, training: bool, temperature: float) -> torch.Tensor:
        """This rank's mask of ``pname`` (neuron masks unexpanded), as NeuroSurgeon's
        ``_compute_mask``: while training, soft ``sigmoid(temperature * logits)`` (continuous
        sparsification) or a sampled hard-concrete gate (:meth:`_gates`); else the hard mask
        (:meth:`_hard`), its complement (``zero_ablate``/``random_ablate``) or a sampled
        one."""
        mp = self.params[pname]
        if self.method == "magnitude_pruning":
            self._rank_by_magnitude(mp)  # not trained: always the hard mask of the weights now
        logits = mp.logits
        hard = not training or not logits.requires_grad
        if not hard:
            if self.ablation != "none":
                raise ValueError(f"ablation {self.ablation!r} is for evaluation: call "
                                 "circuit.eval() first (masks cannot be ablated while training)")
            if self.method == "hard_concrete":
                return self._gates(mp)
            return torch.sigmoid(temperature * logits)
        if self.ablation == "none":
            return self._hard(logits).to(logits.dtype)
        if self.ablation in ("zero_ablate", "random_ablate"):
            return (~self._hard(logits)).to(logits.dtype)
        return self._sampled(mp).to(logits.dtype)

    def _hard(self, logits: torch.Tensor) -> torch.Tensor:
        """The eval mask as NeuroSurgeon computes it, in the logits' dtype: ``logits > 0``
        (continuous sparsification); ``clamp(sigmoid(logits) * (r - l) + l, 0, 1) > 0.5``
        (hard concrete: the same but at a logit of exactly 0, which that rounding keeps)."""
        if self.method == "hard_concrete":  # in float32, NeuroSurgeon's mask dtype
            stretched = torch.sigmoid(logits.float()) * (HC_RIGHT - HC_LEFT) + HC_LEFT
            return torch.clamp(stretched, 0.0, 1.0) > 0.5
        return hard_mask(logits)

    @torch.no_grad()
    def _rank_by_magnitude(self, mp: MaskedParam) -> None:
        """Magnitude pruning: keep the weights whose magnitude is at least the
        ``prune_percentage`` quantile of the whole parameter's magnitudes (all of them above it
        at 1.0, as NeuroSurgeon), from the weights as they are now (a collective over the ranks
        that share the parameter: the quantile is the whole parameter's). The result is kept
        in ``logits`` as +1 / -1, so the hard mask, its ablations and the statistics are the
        other methods'. NeuroSurgeon 0.1.0 ranks the signed values instead of the magnitudes,
        contrary to its own description."""
        full = self._whole_parameter(mp).detach().abs().double()  # compared unrounded
        threshold = _quantile(full.reshape(-1).double(), self.prune_percentage)
        keep = full > threshold if self.prune_percentage == 1.0 else full >= threshold
        local = mp.region.take(keep).to(device=mp.logits.device)
        mp.logits.copy_(local.to(mp.logits.dtype) * 2 - 1)

    def _whole_parameter(self, mp: MaskedParam) -> torch.Tensor:
        """The whole masked parameter as the layer holds it now (collective over the ranks
        that share it), read through the layer's parameter slot -- the parameter of the
        outermost call when the layer is inside its own forward (the slot then holds the
        masked weight) -- so that a model moved (``.to``), deep-copied or reloaded with
        ``assign=True`` after the circuit was built is read as it is, not as it was."""
        from flex_surgery.parallel import frameworks

        slot = self.saved[0][mp.pname] if self.saved else self.module._parameters[mp.pname]
        whole = frameworks.parameter_view(f"{self.name}.{mp.pname}", self.module, mp.pname,
                                          slot, mp.tp_group).gather()
        if mp.compute_dtype is not None:  # the stored shards, as the forward sees them
            whole = whole.to(mp.compute_dtype)
        if whole.shape != mp.param_full_shape:
            raise ValueError(
                f"{self.name}.{mp.pname} is now {tuple(whole.shape)} as a whole, but its mask "
                f"was made for {tuple(mp.param_full_shape)}: build a new CircuitModel after "
                "changing the model's parameters' shapes")
        return whole

    def _gates(self, mp: MaskedParam) -> torch.Tensor:
        """A hard-concrete training mask: ``clamp(sigmoid((log u - log(1 - u) + logits) / T)
        * (r - l) + l, 0, 1)`` with ``u`` uniform in [0.0001, 0.9999], drawn anew at every
        call. ``u`` is drawn at the full mask's shape from a generator seeded by
        ``(seed, layer, draw)`` and cut to this rank's region, so every rank and every layout
        gates each weight as one process does (NeuroSurgeon draws from the global RNG)."""
        gen = _generator(self.seed, f"{self.name}.{mp.pname}/gates", self._gate_draw(mp),
                         torch.device("cpu"))
        u = torch.rand(mp.full_shape, generator=gen, dtype=torch.float64).clamp_(1e-4, 1 - 1e-4)
        u = mp.region.take(u).to(device=mp.logits.device, dtype=mp.logits.dtype)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + mp.logits) / HC_TEMPERATURE)
        return torch.clamp(s * (HC_RIGHT - HC_LEFT) + HC_LEFT, 0.0, 1.0)

    def _gate_draw(self, mp: MaskedParam) -> int:
        """The draw of this call's gates: the next one in a forward; in a forward recomputed
        inside the backward (activation checkpointing), the draw of the forward it recomputes,
        so the gradient belongs to the gates that made the output.

        Which forward that is, torch's checkpoint says through the CPU generator: it saves the
        generator's state at the start of the region and restores it for the recompute, so the
        layer's call sees the state its forward call saw (this is how dropout masks repeat).
        Each call records that state with its draw, and takes one number from the generator so
        that no two calls see the same state (NeuroSurgeon draws its gates from that generator
        too). The generator reseeded to one state (a fixed-seed validation between steps) gives
        a later forward the state of an earlier one: the later one takes it over when the
        earlier one's graph is gone (a backward without ``retain_graph`` recomputed it), and
        otherwise neither can be told apart. A recompute that finds no draw for its state --
        ``preserve_rng_state=False``, a forward older than :data:`GATE_DRAWS_REMEMBERED`
        forwards, two live forwards at one state -- raises rather than train on other gates."""
        state = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(),
                                digest_size=16).digest()
        torch.empty((), dtype=torch.int64).random_()  # the next call sees another state
        if torch._C._current_graph_task_id() == -1:
            draw = mp.noise_draws
            mp.noise_draws += 1
            earlier = mp.gate_draws.get(state, (0, True))
            mp.gate_draws[state] = (draw, False) if earlier is not None and earlier[1] else None
            mp.gate_draws.move_to_end(state)
            while len(mp.gate_draws) > GATE_DRAWS_REMEMBERED:
                mp.gate_draws.popitem(last=False)
            return draw
        entry = mp.gate_draws.get(state)
        draw = self._agreed_recompute_draw(mp, None if entry is None else entry[0])
        # a backward that does not keep the graph frees the forward's: nothing recomputes it
        # again, so a later forward may take its state over
        spent = not torch._C._autograd._get_current_graph_task_keep_graph()
        mp.gate_draws[state] = (draw, spent)
        return draw

    def _agreed_recompute_draw(self, mp: MaskedParam, mine: int | None) -> int:
        """The draw a recompute uses, agreed by the ranks that hold the layer (one collective
        over the circuit's group): each rank finds its draw from its own generator's history,
        so one rank may miss (or find another) where its peers do not. Every rank then raises
        alike -- one rank raising alone would leave the others waiting in the layer's
        collectives -- and ranks that found different draws would gate their parts of the
        weight with different masks, which no one process does."""
        low = high = -1 if mine is None else mine
        if mp.group is not None:
            bounds = torch.tensor([high, -low], dtype=torch.int64, device=mp.logits.device)
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=mp.group)
            high, low = int(bounds[0]), -int(bounds[1])
        if low >= 0 and low == high:
            return low
        if mine is None:
            where = "this rank's"
        elif low < 0:
            where = "another rank's (this rank found its draw)"
        else:
            where = f"the ranks' (they found draws {low} to {high}, this rank {mine})"
        raise ValueError(
            f"{self.name}.{mp.pname}: hard-concrete gates are drawn in a forward recomputed "
            "inside the backward (activation checkpointing) that does not match a recent "
            f"training forward of this layer by {where} CPU generator state, so its gates -- "
            "and the gradients -- would be other ones. Checkpoint with "
            "preserve_rng_state=True (the default), do not reseed torch between the "
            "forwards of one backward (nor differently on different ranks), and "
            f"backpropagate within {GATE_DRAWS_REMEMBERED} forwards")

    def _sampled(self, mp: MaskedParam) -> torch.Tensor:
        """A random mask removing as many elements as the trained mask keeps, drawn at the full
        shape from a seeded generator (from everywhere, or from the complement of the trained
        mask), cut to this rank's region; drawn once, again after ``force_resample``."""
        if mp.sampled is not None and not mp.resample:
            return mp.sampled
        mp.resample = False  # per parameter: the weight's draw must not use up the bias's
        full = mp.gather(mp.logits)
        kept = self._hard(full)
        keep = int(kept.sum())
        gen = _generator(self.seed, f"{self.name}.{mp.pname}/{self.ablation}", mp.draws,
                         torch.device("cpu"))
        mp.draws += 1
        flat = full.reshape(-1).cpu()
        if self.ablation == "complement_sampled":
            complement = (~kept.reshape(-1).cpu()).nonzero().flatten()  # what it removes
            if keep > complement.numel():
                raise ValueError(f"{self.name}.{mp.pname}: complement_sampled needs at most half "
                                 f"of the mask kept ({keep} kept, {complement.numel()} removed)")
            chosen = complement[torch.randperm(complement.numel(), generator=gen)[:keep]]
        else:
            chosen = torch.randperm(flat.numel(), generator=gen)[:keep]
        sampled = torch.ones(flat.numel())
        sampled[chosen] = 0.0
        mp.sampled = mp.region.take(sampled.reshape(mp.full_shape)).to(mp.logits.device)
        return mp.sampled

    def _random_values(self, mp: MaskedParam) -> torch.Tensor:
        """Fresh values for ``random_ablate`` at the parameter's full shape (Kaiming-uniform
        weights, uniform(+-1/sqrt(fan_in)) biases, as ``nn.Linear`` initialises), seeded, cut
        to this rank's shard."""
        like = mp.logits  # the circuit's dtype and device, which follow circuit.to(...)
        if mp.random_values is None or (mp.random_values.dtype, mp.random_values.device) \
                != (like.dtype, like.device):  # drawn again: a cast would keep a rounding
            gen = _generator(self.seed, f"{self.name}.{mp.pname}", -1, torch.device("cpu"))
            weight_shape = self.params["weight"].param_full_shape if "weight" in self.params \
                else mp.param_full_shape
            if mp.pname == "weight":
                full = torch.empty(mp.param_full_shape)
                nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            else:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(weight_shape,
                                                                               device="meta"))
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                full = torch.empty(mp.param_full_shape).uniform_(-bound, bound, generator=gen)
            mp.random_values = mp.param_region.take(full).to(device=like.device,
                                                             dtype=like.dtype)
        return mp.random_values

    # -- statistics --------------------------------------------------------------------------
    def l0_terms(self, training: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's L0 with gradient, this rank's leader-only L0 for the global value):
        the number of weights the mask keeps (neuron masks count every weight of a neuron)."""
        total = leader = None
        for mp in self.params.values():
            # Summed in float64: in the model's dtype a bf16 sum of 771 ones is 772, an fp16
            # sum of 90,000 is inf (float32 is exact only below 2**24 elements).
            if self.method == "hard_concrete" and training and mp.logits.requires_grad:
                # the expected number of open gates (Louizos et al.), not a sampled mask's; one
                # per gate, a neuron's too (NeuroSurgeon's calculate_l0 in training)
                open_ = torch.sigmoid(mp.logits - HC_TEMPERATURE *
                                      math.log(-HC_LEFT / HC_RIGHT))
                part = open_.sum(dtype=torch.float64)
            else:
                part = self.mask(mp.pname, training, temperature).sum(dtype=torch.float64) * \
                    mp.fan
            total = part if total is None else total + part
            lead = part if mp.leader else torch.zeros_like(part)
            leader = lead if leader is None else leader + lead
        return total, leader

    def max_l0(self) -> int:
        return sum(math.prod(mp.param_full_shape) for mp in self.params.values())

    # -- forward -----------------------------------------------------------------------------
    def masked(self, pname: str, live: torch.Tensor, training: bool,
               temperature: float) -> torch.Tensor:
        """``live * mask`` (or the ``random_ablate`` blend) in the form ``live`` has now."""
        mp = self.params[pname]
        # in the weight's dtype: under mixed precision (FSDP2's param_dtype) the forward's
        # weight is not in the logits' dtype, and the layer computes in the weight's
        mask = self._lift(mp, self.mask(pname, training, temperature), live).to(live.dtype)
        if self.ablation == "random_ablate" and not (training and mp.logits.requires_grad):
            rand = self._lift_values(mp, self._random_values(mp), live).to(live.dtype)
            return live * mask + (1 - mask) * rand
        return live * mask

    def _lift(self, mp: MaskedParam, local: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Bring a local mask to the form of the weight the module computes with."""
        from flex_surgery.parallel.frameworks import is_dtensor

        stored = mp.stored
        if is_dtensor(live):  # DTensor tensor parallelism: a DTensor mask of the same layout
            return self._as_dtensor(mp, local, live)
        if stored is not None:  # FSDP2 mid-forward: the full weight
            from torch.distributed.tensor import Partial

            placements = stored.placements
            return self._as_dtensor(mp, local, stored).full_tensor(
                grad_placements=[Partial("avg")] * len(placements))
        if mp.tp_group is not None and mp.partition_dim is not None and \
                mp.full_shape[mp.partition_dim] == 1 and \
                mp.param_full_shape[mp.partition_dim] > 1:
            return _AllReduceGrad.apply(local, mp.tp_group)
        if mp.tp_group is not None and mp.grad_partial is not None:
            # A parameter replicated over the tensor-parallel group whose gradient its framework
            # reduces after backward (Megatron's sequence-parallel parameters, e.g. a
            # row-parallel bias added to this rank's tokens only): the mask's too.
            return _AllReduceGrad.apply(local, mp.tp_group, mp.grad_partial == "avg")
        return local

    def _lift_values(self, mp: MaskedParam, local: torch.Tensor,
                     live: torch.Tensor) -> torch.Tensor:
        from flex_surgery.parallel.frameworks import is_dtensor

        if is_dtensor(live):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(local, live.device_mesh, live.placements,
                                      shape=live.shape, stride=live.stride())
        stored = mp.stored
        if stored is not None:
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(local, stored.device_mesh, stored.placements,
                                      shape=stored.shape, stride=stored.stride).full_tensor()
        return local

    @staticmethod
    def _as_dtensor(mp: MaskedParam, local: torch.Tensor, like: Any):
        from torch.distributed.tensor import DTensor, Replicate

        placements = [Replicate() if p.is_shard() and mp.full_shape[p.dim] == 1
                      and mp.param_full_shape[p.dim] > 1 else p for p in like.placements]
        stride = torch.empty(mp.full_shape, device="meta").stride()
        return DTensor.from_local(local, like.device_mesh, placements, shape=mp.full_shape,
                                  stride=stride)

    def region_keys(self) -> list[tuple]:
        return [_region_key(mp.region) for mp in self.params.values()]
