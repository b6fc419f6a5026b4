"""DiskStore: retrieved tensors streamed to safetensors files by a background thread.

Each writer (a storing rank) buffers what hooks hand it; when the buffer reaches
``buffer_bytes`` (or on :meth:`flush`) the buffer goes to a writer thread, which writes one
safetensors file, renames it into place (a reader never sees a half-written file), and then
rewrites the writer's JSON index the same way. So the forward only waits for the disk when the
previous buffer is still being written (host memory stays under two buffers), a crash loses at
most the unwritten buffers, and anything the index names is complete.

Layout of ``directory``::

    store.json                      fingerprint of the run (model, mesh) that created it
    index-rank{R}.json              what writer R wrote: one entry per tensor
    rank{R}-{SEQ:06d}.safetensors   one file per flush of writer R

Reading (:meth:`DiskStore.read`) merges every writer's index, so any process can read the whole
dataset, whichever ranks wrote it.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flex_surgery.files import write_atomically
from flex_surgery.parallel.runtime import wait_for_host_copies
from flex_surgery.store.base import StoreError, WriteMeta
from flex_surgery.store.merge import merge_pieces

_MANIFEST = "store.json"


def _write_atomically(path: Path, text: str) -> None:
    # The temporary name carries the process id: writers may race on store.json.
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


class DiskStore:
    """Stream stored tensors to safetensors files in ``directory``.

    Args:
        directory: created if missing; must be writable (checked at once).
        buffer_bytes: tensor bytes buffered before a file is written (default 256 MiB).
        writer: the rank that writes here (default: this process's global rank, or 0).
    """

    #: Shared between processes: any process that sees the directory reads every writer's part.
    process_local = False

    def __init__(self, directory: str | os.PathLike, buffer_bytes: int = 256 << 20,
                 writer: int | None = None) -> None:
        if buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be > 0, got {buffer_bytes}")
        self.directory = Path(directory)
        self.buffer_bytes = int(buffer_bytes)
        if writer is None:
            import torch.distributed as dist
            writer = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.writer = int(writer)
        self.fingerprint: dict[str, Any] | None = None
        self._check_writable()
        self._index_path = self.directory / f"index-rank{self.writer}.json"
        self._entries: list[dict[str, Any]] = self._load_own_index()
        self._seq = 1 + max((int(e["file"].rsplit("-", 1)[1].split(".")[0])
                             for e in self._entries), default=-1)
        self._buffer: list[tuple[str, torch.Tensor, WriteMeta]] = []
        self._buffered = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock_file: Any = None  # held from the first put/attach until close

    # -- opening -------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe-rank{self.writer}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as error:
            raise StoreError(f"the store directory {str(self.directory)!r} is not writable: "
                             f"{error}") from error

    def _claim_writer(self) -> None:
        """Hold ``.lock-rank{R}`` (``flock``) from this store's first write until :meth:`close`.

        Two open stores of one writer on one directory (a notebook cell run again while the
        first store still buffers, two one-process jobs on one directory) would both number
        their files from the same index: the later write replaces the other's file and index,
        and a read returns one run's tensors as the other's. The second is refused instead.
        Reading takes no lock. A file system without ``flock`` is used without one.
        """
        if self._lock_file is not None:
            return
        import fcntl

        path = self.directory / f".lock-rank{self.writer}"
        handle = open(path, "a")  # noqa: SIM115 -- held until close
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"another DiskStore (in this process or another) is writing as writer "
                    f"{self.writer} in {str(self.directory)!r}; close it first, or use another "
                    "directory (nothing was written)") from error
            return  # no flock on this file system
        self._lock_file = handle
        # The index may have grown since this store read it (a store of this writer that
        # was closed in between): number new files after everything on disk.
        self._entries = self._load_own_index()
        self._seq = max(self._seq, 1 + max(
            (int(e["file"].rsplit("-", 1)[1].split(".")[0]) for e in self._entries),
            default=-1))

    def _release_writer(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _load_own_index(self) -> list[dict[str, Any]]:
        if not self._index_path.exists():
            return []
        try:
            return json.loads(self._index_path.read_text())["entries"]
        except (OSError, ValueError, KeyError) as error:
            raise StoreError(f"cannot read the store index {str(self._index_path)!r}: "
                             f"{error}") from error

    def attach(self, fingerprint: dict[str, Any]) -> None:
        """Bind the store to one run; a directory written by another model or mesh is refused.

        ``store.json`` records the mesh of the first run, and each writer's index the model it
        stored from (pipeline stages hold different modules, so the model is per writer). A
        later run with the same ones appends (its steps continue after those stored by any
        writer: :meth:`next_steps`); any other raises before anything is written. What this
        writer still buffers (from an earlier FlexModel on the same store) is written first, so
        that every writer's steps are on disk when the run reads them.
        """
        self.flush()
        manifest = self.directory / _MANIFEST
        recorded = {"mesh": fingerprint.get("mesh")}
        own = None
        if self._index_path.exists():
            own = json.loads(self._index_path.read_text()).get("fingerprint")
        if manifest.exists():
            recorded = json.loads(manifest.read_text())
        if recorded.get("mesh") != fingerprint.get("mesh") or own not in (None, fingerprint):
            raise StoreError(
                f"the store {str(self.directory)!r} holds a run of {own or recorded}; this run "
                f"is {fingerprint}. Use a new directory (nothing in this one was changed).")
        self.fingerprint = fingerprint
        self._claim_writer()
        try:
            if not manifest.exists():
                _write_atomically(manifest, json.dumps(recorded, indent=1))
            if own is None:
                self._write_index(self._entries)
        except OSError as error:
            raise StoreError(f"cannot write to {str(self.directory)!r}: {error}") from error

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        index = {"writer": self.writer, "fingerprint": self.fingerprint, "entries": entries}
        _write_atomically(self._index_path, json.dumps(index))
        self._entries = entries

    # -- writing -------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Tensor bytes held in host memory: the buffer plus the one being written."""
        with self._lock:
            return self._buffered + self._in_flight

    def next_steps(self) -> dict[str, int]:
        """The step a new call of each stored name gets: after every step that *any* writer
        stored under it in this directory (and this writer still buffers).

        Per writer would not do: a reopened directory where writer 0 stored steps 0-1 of a
        ``store_on="rank0"`` run and writer 1 nothing would have writer 1 number its first
        call 0 again, and a read merge it with another call. FlexModel asks once, on every
        rank when the run is built (after every store was flushed), and checks that the ranks
        agree (:func:`~flex_surgery.store.hooks.bind_store`)."""
        steps: dict[str, int] = {}
        for e in self.index():
            steps[e["name"]] = max(steps.get(e["name"], 0), int(e["step"]) + 1)
        for n, _, m in self._buffer:
            steps[n] = max(steps.get(n, 0), m.step + 1)
        return steps

    def next_step(self, name: str) -> int:
        """The step a new call of ``name`` gets (see :meth:`next_steps`)."""
        return self.next_steps().get(name, 0)

    def put(self, name: str, tensor: torch.Tensor, meta: WriteMeta) -> None:
        self._raise_pending()
        if self._closed:
            raise StoreError("this DiskStore is closed")
        self._claim_writer()
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        self._buffer.append((name, tensor.contiguous(), meta))
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            self._buffered += nbytes
        if self._buffered >= self.buffer_bytes:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._buffer:
            return
        # Tensors copied from a GPU land in pinned memory without blocking (store_copy); the
        # thread must not write one before its copy is complete.
        wait_for_host_copies()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flex-surgery-disk-store",
                                            daemon=True)
            self._thread.start()
        batch, self._buffer = self._buffer, []
        with self._lock:
            size, self._buffered = self._buffered, 0
        seq, self._seq = self._seq, self._seq + 1
        self._queue.join()  # waits only while the previous buffer is still being written
        with self._lock:
            self._in_flight += size
        self._queue.put((seq, batch, size))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, nothing more is written
                    self._write(*item)
            except BaseException as error:  # surfaced on the next put/flush/close
                self._error = error
            finally:
                if item is not None:
                    with self._lock:
                        self._in_flight -= item[2]
                self._queue.task_done()

    def _write(self, seq: int, batch: list, size: int) -> None:
        fname = f"rank{self.writer}-{seq:06d}.safetensors"
        final = self.directory / fname
        tmp = self.directory / f".{fname}.tmp"
        tensors, entries = {}, []
        for i, (name, tensor, meta) in enumerate(batch):
            key = f"t{i}"
            tensors[key] = tensor
            entries.append({"name": name, "file": fname, "key": key, **asdict(meta),
                            "shape": list(tensor.shape), "dtype": str(tensor.dtype)})
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._write_index(self._entries + entries)

    @property
    def error(self) -> BaseException | None:
        """The failure of a write in the background (``None`` while every write succeeded).
        Once set, nothing more is written and every ``put``, ``flush`` and ``close`` raises
        it; FlexModel reads it to raise it on every rank (``FlexModel.check_store``)."""
        return self._error

    def _raise_pending(self) -> None:
        if self._error is not None:
            error = self._error
            raise StoreError(f"writing to {str(self.directory)!r} failed: {error!r}; the "
                             "files and index already written are intact, the buffer that "
                             "failed was not stored") from error

    def flush(self) -> None:
        """Write everything buffered and wait for it; raise the writer thread's error, if any."""
        self._raise_pending()
        self._hand_over()
        if self._thread is not None:
            self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Flush, then stop the writer thread. A second call does nothing."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
            self._release_writer()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def index(self) -> list[dict[str, Any]]:
        """Every writer's entries (what is on disk now, not what is still buffered)."""
        entries = []
        for path in sorted(self.directory.glob("index-rank*.json")):
            entries += json.loads(path.read_text())["entries"]
        return entries

    def names(self) -> list[str]:
        return sorted({e["name"] for e in self.index()})

    def steps(self, name: str) -> list[int]:
        return sorted({e["step"] for e in self.index() if e["name"] == name})

    def to_dict(self) -> dict[str, list[torch.Tensor]]:
        """The merged view: ``{name: [tensor of step 0, 1, ...]}``, as ``output_dict`` holds it
        with ``keep="all"`` (every tensor read into memory: for datasets that fit)."""
        return {name: [self.read(name, step) for step in self.steps(name)]
                for name in self.names()}

    def read(self, name: str, step: int = 0, batch: slice | None = None) -> torch.Tensor:
        """The tensor ``name`` stored at ``step`` (rows ``batch`` of the global batch), put
        together from every writer's pieces. Flushes this process's buffer first."""
        if not self._closed:
            self.flush()
        entries = self.index()
        mine = [e for e in entries if e["name"] == name]
        if not mine:
            raise StoreError(f"nothing stored under {name!r} in {str(self.directory)!r}; "
                             f"stored: {sorted({e['name'] for e in entries})}")
        at_step = [e for e in mine if e["step"] == step]
        if not at_step:
            raise StoreError(f"{name!r} has no step {step}; stored steps: "
                             f"{sorted({e['step'] for e in mine})}")
        pieces = []
        for e in at_step:
            with safe_open(str(self.directory / e["file"]), framework="pt") as f:
                tensor = f.get_tensor(e["key"])
            # An entry written before batch_total was recorded lacks it: -1, read as before.
            fields = WriteMeta.__dataclass_fields__
            pieces.append((WriteMeta(**{k: e[k] for k in fields if k in e}), tensor))
        return merge_pieces(name, pieces, batch)
