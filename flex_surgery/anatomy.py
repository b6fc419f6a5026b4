"""Where the parts of a known architecture live: blocks, final norm, embedding, unembedding.

A lookup table keyed by model class name, not a heuristic: an architecture that is not in the
table raises :class:`UnknownArchitecture` (listing the known ones and how to register a new
one) instead of guessing or returning ``None``. A part an architecture genuinely lacks (BERT's
encoder has no final norm; bare encoders have no unembedding) is ``None`` in the table, and
asking for it raises :class:`MissingPart`.

Wrapped models are found through their wrappers: FSDP1 / checkpoint / ``torch.compile`` name
tokens are removed (:func:`~flex_surgery.naming.clean_name`), and the first module whose
class is in the table gives the prefix, so ``DDP(model)``, ``FSDP(model)`` or a FlexModel
around the model resolve the same parts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from flex_surgery.naming import class_name, modules_by_clean_name

__all__ = [
    "ANATOMIES",
    "Anatomy",
    "Located",
    "MissingPart",
    "UnknownArchitecture",
    "block_names",
    "locate",
    "pipeline_flexmodel",
    "register_anatomy",
]


@dataclass(frozen=True)
class Anatomy:
    """Dotted paths, relative to the model class the entry is keyed by.

    ``blocks`` is the ``nn.ModuleList`` of transformer blocks; ``final_norm``, ``embed`` and
    ``unembed`` are modules, or ``None`` where the architecture has none. A part may be a tuple
    of paths where releases of a library name it differently (GPT-NeoX's head is ``embed_out``
    in transformers 4, ``lm_head`` in 5): the first one the model holds is the part.
    """

    blocks: str | tuple[str, ...]
    final_norm: str | tuple[str, ...] | None
    embed: str | tuple[str, ...] | None
    unembed: str | tuple[str, ...] | None


_LLAMA_LM = Anatomy("model.layers", "model.norm", "model.embed_tokens", "lm_head")
_LLAMA_BARE = Anatomy("layers", "norm", "embed_tokens", None)

ANATOMIES: dict[str, Anatomy] = {
    # Llama-style decoders (Mistral, Qwen2/3, Phi-3 and the Mixtral / Qwen2-MoE mixtures share
    # the layout). Not Gemma: its final logits are soft-capped after ``lm_head``, which a lens
    # through ``lm_head`` alone would not do.
    **{f"{arch}ForCausalLM": _LLAMA_LM
       for arch in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Mixtral", "Qwen2Moe")},
    **{f"{arch}Model": _LLAMA_BARE
       for arch in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Mixtral", "Qwen2Moe")},
    # Megatron-core's GPTModel ([s, b, h] residuals; the head is ``output_layer``, vocab-split
    # under TP).
    "GPTModel": Anatomy("decoder.layers", "decoder.final_layernorm", "embedding.word_embeddings",
                        "output_layer"),
    # GPT-2
    "GPT2LMHeadModel": Anatomy("transformer.h", "transformer.ln_f", "transformer.wte", "lm_head"),
    "GPT2Model": Anatomy("h", "ln_f", "wte", None),
    # OPT
    "OPTForCausalLM": Anatomy("model.decoder.layers", "model.decoder.final_layer_norm",
                              "model.decoder.embed_tokens", "lm_head"),
    "OPTModel": Anatomy("decoder.layers", "decoder.final_layer_norm", "decoder.embed_tokens",
                        None),
    # GPT-NeoX (Pythia), Bloom, GPT-Neo: pre-norm decoders, the head after one final norm.
    "GPTNeoXForCausalLM": Anatomy("gpt_neox.layers", "gpt_neox.final_layer_norm",
                                  "gpt_neox.embed_in", ("lm_head", "embed_out")),
    "GPTNeoXModel": Anatomy("layers", "final_layer_norm", "embed_in", None),
    "BloomForCausalLM": Anatomy("transformer.h", "transformer.ln_f",
                                "transformer.word_embeddings", "lm_head"),
    "BloomModel": Anatomy("h", "ln_f", "word_embeddings", None),
    "GPTNeoForCausalLM": Anatomy("transformer.h", "transformer.ln_f", "transformer.wte",
                                 "lm_head"),
    "GPTNeoModel": Anatomy("h", "ln_f", "wte", None),
    # BERT: post-norm blocks, no final norm. The masked-LM head runs its transform (dense,
    # activation, LayerNorm) before the decoder; it stands where a final norm would, so that
    # the lens decodes as the head does.
    "BertModel": Anatomy("encoder.layer", None, "embeddings.word_embeddings", None),
    "BertForMaskedLM": Anatomy("bert.encoder.layer", "cls.predictions.transform",
                               "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
    # ViT (transformers 5 keeps the blocks at ``layers``, 4 at ``encoder.layer``).
    "ViTModel": Anatomy(("layers", "encoder.layer"), "layernorm",
                        "embeddings.patch_embeddings.projection", None),
    "ViTForImageClassification": Anatomy(("vit.layers", "vit.encoder.layer"), "vit.layernorm",
                                         "vit.embeddings.patch_embeddings.projection",
                                         "classifier"),
}


class UnknownArchitecture(KeyError):
    """No module of the model has a class listed in :data:`ANATOMIES`."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingPart(LookupError, ValueError):
    """The architecture has no such part (e.g. BERT's final norm). A ``LookupError``, and a
    ``ValueError`` as tuned-lens's ``get_final_norm`` raises for a model without one."""


def register_anatomy(class_name: str, anatomy: Anatomy) -> None:
    """Add (or replace) the entry for a model class, e.g. a custom research model."""
    ANATOMIES[class_name] = anatomy


@dataclass(frozen=True)
class Located:
    """An :class:`Anatomy` found inside a (possibly wrapped) model.

    ``prefix`` is the clean name of the model class the entry is keyed by; the ``*_name``
    methods return clean names usable as ``SurgicalTheater(layers=...)`` targets.
    """

    root: nn.Module
    arch: str
    prefix: str
    anatomy: Anatomy

    def _candidates(self, part: str) -> list[str]:
        rel = getattr(self.anatomy, part)
        if rel is None:
            raise MissingPart(f"{self.arch} has no {part.replace('_', ' ')}")
        return [f"{self.prefix}.{r}" if self.prefix else r
                for r in ((rel,) if isinstance(rel, str) else rel)]

    def _path(self, part: str) -> str:
        """The part's clean name: of several paths, the first the model holds (the first one
        when it holds none, e.g. a pipeline stage without the head)."""
        candidates = self._candidates(part)
        if len(candidates) > 1:
            table = modules_by_clean_name(self.root, outermost=True)
            return next((c for c in candidates if c in table), candidates[0])
        return candidates[0]

    def module(self, part: str) -> nn.Module:
        """The module of ``part`` (``"blocks"``, ``"final_norm"``, ``"embed"``, ``"unembed"``)."""
        candidates = self._candidates(part)
        if len(candidates) == 1:
            return _module_by_clean_name(self.root, candidates[0])
        table = modules_by_clean_name(self.root, outermost=True)
        for c in candidates:
            if c in table:
                return table[c]
        raise MissingPart(f"{self.arch}: no module named any of {candidates}")

    def name(self, part: str) -> str:
        return self._path(part)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module("blocks")

    def block_name(self, index: int) -> str:
        """Clean name of block ``index`` (negative counts from the end, like a list)."""
        n = len(self.blocks)
        if not -n <= index < n:
            raise IndexError(f"{self.arch} has {n} blocks (0..{n - 1}); got block index {index}")
        return f"{self._path('blocks')}.{index % n}"


def _module_by_clean_name(root: nn.Module, name: str) -> nn.Module:
    """The outermost module named ``name`` (the wrapper, if one wraps it: what sits in the
    parent, e.g. an FSDP unit in the list of blocks)."""
    table = modules_by_clean_name(root, outermost=True)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        raise MissingPart(f"no module named {name!r}; close matches: {close}")
    return table[name]


def locate(model: nn.Module) -> Located:
    """Find the outermost module of ``model`` whose class is in :data:`ANATOMIES`.

    A model of an unknown class that holds *two* known architectures side by side (a
    ``VisionEncoderDecoderModel``: a ViT encoder and a GPT-2 decoder) is ambiguous -- which
    one's blocks are "the layers" is the user's choice -- and raises, rather than taking the
    first one met."""
    # Innermost: a wrapper's class (FSDP, checkpoint) is not an architecture, what it wraps is.
    found: list[tuple[str, str]] = []
    for name, module in modules_by_clean_name(model).items():
        arch = class_name(module)  # fully_shard's FSDP<Class> is the class
        if arch not in ANATOMIES or any(name.startswith(f"{outer}.") or outer == ""
                                        for outer, _ in found):
            continue  # not known, or a part of a known architecture found already
        found.append((name, arch))
    if len(found) > 1:
        parts = ", ".join(f"{arch} at {name!r}" for name, arch in found)
        raise UnknownArchitecture(
            f"{type(model).__name__} is not a known architecture and holds several known ones "
            f"({parts}): which one's blocks to use is ambiguous. Pass the part itself (e.g. "
            f"model.{found[-1][0]}), name modules explicitly, or register "
            f"{type(model).__name__} with flex_surgery.anatomy.register_anatomy")
    if found:
        name, arch = found[0]
        return Located(model, arch, name, ANATOMIES[arch])
    raise UnknownArchitecture(
        f"no known architecture inside {type(model).__name__}; known: {sorted(ANATOMIES)}. "
        "Name modules explicitly (e.g. layers='model.layers.0') or add an entry with "
        "flex_surgery.anatomy.register_anatomy(class_name, Anatomy(...))"
    )


def block_names(model: nn.Module) -> list[str]:
    """Clean names of the transformer blocks, in order."""
    loc = locate(model)
    return [loc.block_name(i) for i in range(len(loc.blocks))]


def pipeline_flexmodel(model: nn.Module) -> nn.Module | None:
    """The FlexModel over pipeline stages that ``model`` is, or that wraps it (or the model
    inside its DDP / FlexModel wrappers); ``None`` when there is none or it runs one stage.

    Such a model is one *stage*: it holds some of the blocks, so a block index means nothing
    on its own here (stages may number their blocks from 0, or keep the whole model's
    numbering), and a name may belong to another stage. The FlexModel exchanged every stage's
    names when it was built, so its answer is the same on every rank; no collective is run."""
    from flex_surgery.hooks.wrapper import _WRAPPED_BY, FlexModel
    from flex_surgery.naming import unwrap_model

    found = model if isinstance(model, FlexModel) else None
    if found is None:
        ref = _WRAPPED_BY.get(unwrap_model(model))
        found = ref() if ref is not None else None
        if found is not None and found._restored:
            found = None
    mesh = getattr(getattr(found, "runtime", None), "mesh", None)
    if mesh is None or mesh.pp_size == 1:
        return None
    return found
