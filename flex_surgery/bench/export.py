"""The export research runner: what exporting, running and re-weighting a program costs.

``python -m flex_surgery.bench export --model NAME --benchmark static|dynamic|weight_injection
[--test-seq-lengths 32,128,512] --out DIR`` writes one CSV per run, one measurement per row:

* ``static``: one program exported per sequence length (``torch.export.export`` with fixed
  shapes): export time, export peak memory and inference latency at each length;
* ``dynamic``: one program with a dynamic sequence dimension (``Dim("seq")`` up to the longest
  length): its export time and peak memory once, latency at each length;
* ``weight_injection``: one dynamic program, then new weights written into it with
  :func:`~flex_surgery.export.inject_weights` against two references -- a raw ``copy_`` of the
  same bytes into preallocated tensors (the floor for any in-place update) and a re-export of
  the model holding the new weights (what injection saves). Repetitions are interleaved and every
  timed injection and copy is checked to have written exactly the new weights; afterwards the
  program's outputs must equal the eager model's at every length.

Every input is checked before any work (model name, benchmark, lengths, ``--out``), and the CSV
is written to a temporary file in ``--out`` and renamed, so a failed run leaves nothing behind.
Models come from ``configs/models.json`` (:mod:`flex_surgery.bench.models`); nothing is ever
downloaded.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from flex_surgery.bench.measure import PeakMemory, Spread, interleaved, peak_memory, timed
from flex_surgery.bench.models import load_registry
from flex_surgery.export.inject import inject_weights, program_layout

__all__ = ["BENCHMARKS", "COLUMNS", "InjectionCost", "RunConfig", "RunError",
           "measure_injection", "perturbed_weights", "run"]

BENCHMARKS = ("static", "dynamic", "weight_injection")
COLUMNS = ("model", "benchmark", "device", "params", "metric", "seq_len", "unit", "median", "min",
           "max", "repeats")
MIN_SEQ = 2  # torch.export specialises dimensions of size 0 and 1


class RunError(ValueError):
    """A run was asked for something it cannot do; raised before any work is done."""


@dataclass
class RunConfig:
    """One research run (the command line's options)."""

    model: str
    benchmark: str
    out: Path
    seq_lengths: tuple[int, ...] = (32, 128, 512)
    batch: int = 1
    repeats: int = 10
    reexport_repeats: int = 3
    device: str = "cpu"
    models_config: Path | None = None
    progress: bool = True


@dataclass
class InjectionCost:
    """Seconds for new weights by injection, by a raw copy of the same bytes, by re-export."""

    params: int
    bytes: int
    first_inject: float
    inject: Spread
    raw_copy: Spread
    reexport: Spread
    inject_peak: PeakMemory = field(default_factory=PeakMemory)

    @property
    def inject_over_copy(self) -> float:
        return self.inject.median / self.raw_copy.median

    @property
    def inject_over_reexport(self) -> float:
        return self.inject.median / self.reexport.median


# -- validation ----------------------------------------------------------------------------------
def parse_seq_lengths(text: str) -> tuple[int, ...]:
    """``"32,128,512"`` -> ``(32, 128, 512)``; anything else is a :class:`RunError`."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise RunError(f"--test-seq-lengths must be comma-separated integers, not {text!r}"
                       ) from err
    check_seq_lengths(lengths)
    return lengths


def check_seq_lengths(lengths: Sequence[int]) -> None:
    if not lengths:
        raise RunError("give at least one sequence length")
    if min(lengths) < MIN_SEQ:
        raise RunError(f"sequence lengths must be at least {MIN_SEQ} (torch.export specialises "
                       f"dimensions of size 0 and 1), got {min(lengths)}")
    if len(set(lengths)) != len(lengths):
        raise RunError(f"sequence lengths repeat: {list(lengths)}")


def check_out_dir(out: Path) -> None:
    """``out`` is, or can be created as, a writable directory. Nothing is created here."""
    if out.exists():
        if not out.is_dir():
            raise RunError(f"--out {out} exists and is not a directory")
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
                pass
        except OSError as err:
            raise RunError(f"--out {out} is not writable: {err.strerror or err}") from err
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"--out {out} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {out} cannot be created: {parent} is not writable")


# -- building blocks, shared with benchmarks/export_inject.py -------------------------------------
def token_inputs(model: nn.Module, seq: int, batch: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + seq)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen).to(device)}


def export_program(model: nn.Module, example: Mapping[str, torch.Tensor],
                   max_seq: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` the model as a user would: static, or with a dynamic sequence
    dimension up to ``max_seq``."""
    shapes = None
    if max_seq is not None:
        seq = Dim("seq", min=MIN_SEQ, max=max_seq)
        shapes = {name: {1: seq} for name in example}
    return torch.export.export(model, (), kwargs=dict(example), dynamic_shapes=shapes,
                               strict=False)


def perturbed_weights(model: nn.Module, seed: int, scale: float = 0.02
                      ) -> dict[str, torch.Tensor]:
    """The model's state dict with noise added to every floating tensor: new weights of the
    same architecture, tied names still one tensor (so they agree, as a checkpoint's would)."""
    gen = torch.Generator().manual_seed(seed)
    new: dict[tuple, torch.Tensor] = {}
    weights = {}
    for name, value in model.state_dict().items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key not in new:
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
                new[key] = value.detach() + (scale * noise).to(value.dtype).to(value.device)
            else:
                new[key] = value.detach().clone()
        weights[name] = new[key]
    return weights


def latency(program: torch.export.ExportedProgram, model: nn.Module, seq_lengths: Sequence[int],
            batch: int, repeats: int, device: torch.device,
            tick: Callable[[], None] | None = None) -> dict[int, Spread]:
    """Inference latency of ``program.module()`` at each length (one warm-up call each)."""
    runner = program.module()
    result = {}
    with torch.no_grad():
        for seq in seq_lengths:
            inputs = token_inputs(model, seq, batch, device=device)
            runner(**inputs)
            result[seq] = Spread.of([timed(lambda: runner(**inputs), device)[0]  # noqa: B023
                                     for _ in range(repeats)])
            if tick is not None:
                tick()
    return result


def measure_injection(model: nn.Module, program: torch.export.ExportedProgram, repeats: int,
                      reexport: Callable[[], object], reexport_repeats: int,
                      device: torch.device, tick: Callable[[], None] | None = None
                      ) -> InjectionCost:
    """Time :func:`inject_weights` into ``program`` (exported from ``model`` by the caller)
    against a raw ``copy_`` of the same bytes and against ``reexport()``.

    Two weight sets alternate from round to round, so every write changes every value; after
    each timed call the destination is checked to hold exactly the set just written. The first
    injection -- which gives the program tensors of its own -- is timed apart. On return the
    eager model holds the last set written, as the program does.
    """
    sets = [perturbed_weights(model, seed) for seed in (1, 2)]
    layout = program_layout(program)
    slots = layout.slots
    first, _ = timed(lambda: inject_weights(program, sets[1]), device)
    flat = [[ws[slot.names[0]] for slot in slots] for ws in sets]
    buffers = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in slots]
    n_bytes = sum(b.numel() * b.element_size() for b in buffers)
    n_params = sum(b.numel() for b in buffers)
    current = {"round": 0}

    @torch.no_grad()
    def raw_copy() -> None:
        for dst, src in zip(buffers, flat[current["round"] % 2]):
            dst.copy_(src)

    def inject() -> None:
        inject_weights(program, sets[current["round"] % 2])

    def check(name: str, _: object) -> None:
        expected = flat[current["round"] % 2]
        if name == "raw_copy":
            written = buffers
        elif name == "inject":
            written = [program.state_dict[slot.names[0]] for slot in slots]
        else:
            return
        bad = [s.names[0] for s, w, e in zip(slots, written, expected) if not torch.equal(w, e)]
        if bad:
            raise AssertionError(f"{name} did not write the new weights of {bad[:3]}")

    def next_round() -> None:
        current["round"] += 1
        if tick is not None:
            tick()

    rounds = max(repeats, reexport_repeats)
    times = interleaved({"inject": inject, "raw_copy": raw_copy, "reexport": reexport}, rounds,
                        device, check=check, tick=next_round,
                        limits={"inject": repeats, "raw_copy": repeats,
                                "reexport": reexport_repeats})
    last = sets[(repeats - 1) % 2]
    with peak_memory(device) as peak:  # one more, untimed, for its memory
        inject_weights(program, last)
    model.load_state_dict(last)
    return InjectionCost(n_params, n_bytes, first, Spread.of(times["inject"]),
                         Spread.of(times["raw_copy"]), Spread.of(times["reexport"]), peak)


def assert_program_equals_eager(program: torch.export.ExportedProgram, model: nn.Module,
                                seq_lengths: Sequence[int], batch: int,
                                device: torch.device) -> None:
    runner = program.module()
    with torch.no_grad():
        for seq in seq_lengths:
            inputs = token_inputs(model, seq, batch, seed=1, device=device)
            got, want = runner(**inputs).logits, model(**inputs).logits
            if not torch.equal(got, want):
                raise AssertionError(f"program != eager model at sequence length {seq} (max "
                                     f"difference {(got - want).abs().max().item():.3g})")


# -- the runs --------------------------------------------------------------------------------------
class _Rows:
    def __init__(self, config: RunConfig, params: int):
        self.base = {"model": config.model, "benchmark": config.benchmark,
                     "device": config.device, "params": params}
        self.rows: list[dict] = []

    def add(self, metric: str, unit: str, value: Spread | float, seq_len: int | None = None,
            scale: float = 1.0) -> None:
        spread = value if isinstance(value, Spread) else Spread(value, value, value, 1)
        spread = spread.scaled(scale)
        self.rows.append({**self.base, "metric": metric, "seq_len": "" if seq_len is None
                          else seq_len, "unit": unit, "median": f"{spread.median:.6g}",
                          "min": f"{spread.low:.6g}", "max": f"{spread.high:.6g}",
                          "repeats": spread.repeats})

    def memory(self, metric: str, peak: PeakMemory, seq_len: int | None = None) -> None:
        if peak.above_start_mib is not None:
            self.add(metric, "MiB", peak.above_start_mib, seq_len)


def _steps(config: RunConfig) -> int:
    n = len(config.seq_lengths)
    if config.benchmark == "static":
        return 2 * n
    if config.benchmark == "dynamic":
        return 1 + n
    return 1 + max(config.repeats, config.reexport_repeats) + n


def run(config: RunConfig) -> Path:
    """Validate, measure, write ``<out>/<model>-<benchmark>-<time>.csv``; return its path."""
    from tqdm import tqdm

    if config.benchmark not in BENCHMARKS:
        raise RunError(f"unknown benchmark {config.benchmark!r}; choose from {BENCHMARKS}")
    check_seq_lengths(config.seq_lengths)
    if config.repeats < 1 or config.reexport_repeats < 1 or config.batch < 1:
        raise RunError("--repeats, --reexport-repeats and --batch must be at least 1")
    out = Path(config.out)
    check_out_dir(out)
    registry = load_registry(config.models_config)
    try:
        entry = registry[config.model]
    except KeyError as err:
        raise RunError(err.args[0]) from err
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda, but no CUDA device is available")

    model = entry.build().to(device)
    longest, limit = max(config.seq_lengths), entry.max_positions(model)
    if limit is not None and longest > limit:
        raise RunError(f"model {config.model!r} accepts at most {limit} positions; "
                       f"--test-seq-lengths asks for {longest}")
    rows = _Rows(config, sum(p.numel() for p in model.parameters()))
    bar = tqdm(total=_steps(config), desc=f"{config.model} {config.benchmark}", unit="step",
               disable=not config.progress)
    with bar:
        if config.benchmark == "static":
            for seq in config.seq_lengths:
                example = token_inputs(model, seq, config.batch, device=device)
                with peak_memory(device) as peak:
                    seconds, program = timed(lambda: export_program(model, example),  # noqa: B023
                                             device)
                bar.update()
                rows.add("export", "s", seconds, seq)
                rows.memory("export_peak_memory", peak, seq)
                (lat,) = latency(program, model, [seq], config.batch, config.repeats, device,
                                 bar.update).values()
                rows.add("latency", "ms", lat, seq, scale=1e3)
        else:
            example = token_inputs(model, min(config.seq_lengths), config.batch, device=device)
            with peak_memory(device) as peak:
                seconds, program = timed(lambda: export_program(model, example, longest), device)
            bar.update()
            rows.add("export", "s", seconds)
            rows.memory("export_peak_memory", peak)
            if config.benchmark == "weight_injection":
                cost = measure_injection(
                    model, program, config.repeats,
                    lambda: export_program(model, example, longest), config.reexport_repeats,
                    device, bar.update)
                assert_program_equals_eager(program, model, config.seq_lengths, config.batch,
                                            device)
                rows.add("weight_bytes", "MiB", cost.bytes / 1024 ** 2)
                rows.add("first_inject", "ms", cost.first_inject, scale=1e3)
                rows.add("inject", "ms", cost.inject, scale=1e3)
                rows.add("raw_copy", "ms", cost.raw_copy, scale=1e3)
                rows.add("inject_over_raw_copy", "ratio", cost.inject_over_copy)
                rows.add("reexport", "s", cost.reexport)
                rows.add("inject_over_reexport", "ratio", cost.inject_over_reexport)
                rows.memory("inject_peak_memory", cost.inject_peak)
                rows.add("outputs_equal_eager", "bool", 1.0)
            for seq, lat in latency(program, model, config.seq_lengths, config.batch,
                                    config.repeats, device, bar.update).items():
                rows.add("latency", "ms", lat, seq, scale=1e3)
    return write_csv(rows.rows, out, f"{config.model}-{config.benchmark}")


def write_csv(rows: list[dict], out: Path, stem: str) -> Path:
    """Write ``rows`` to a new ``<stem>-<time>.csv`` in ``out`` atomically (temporary file in the
    same directory, then renamed); an existing file is never overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = out / f"{stem}-{stamp}.csv", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{stamp}-{n}.csv"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
