"""Stores behind FlexModel in one process: exact round-trips, reductions and bad input."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.store import DiskStore, MemoryStore, Store, StoreError, WriteMeta
from flex_surgery.store import disk as disk_module

POINTS = ("model.layers.0.mlp", "model.layers.1", "model.norm")


def run_with(output_dict=None, store=None, steps=3, reduce=None, edit=None, batch=4):
    """Three forwards of one tiny llama with hooks on POINTS; different inputs per step."""
    model = tiny_hf_model("llama")
    flex = FlexModel(model, output_dict, store=store)
    for name in POINTS:
        flex.register_forward_hook(HookFunction(name, reduce=reduce, editing_function=edit))
    logits = []
    for step in range(steps):
        logits.append(flex(**example_inputs("llama", batch=batch, seed=step)).logits)
    flex.close()
    return logits


def reference(steps=3, reduce=None, batch=4):
    out: dict = {}
    run_with(out, steps=steps, reduce=reduce, batch=batch)
    return out


def test_stores_implement_the_protocol(tmp_path):
    assert isinstance(MemoryStore(), Store)
    with DiskStore(tmp_path) as store:
        assert isinstance(store, Store)


def test_memory_store_holds_what_output_dict_holds():
    ref = reference()
    store = MemoryStore()
    run_with(store=store)
    assert store.data.keys() == ref.keys()
    for name in POINTS:
        for step, tensor in enumerate(ref[name]):
            assert torch.equal(store.data[name][step], tensor)
            assert torch.equal(store.read(name, step), tensor)
    assert store.host_bytes == sum(t.numel() * t.element_size() for v in ref.values() for t in v)


@pytest.mark.parametrize("buffer_bytes", [1, 4096, 1 << 30])
def test_disk_store_reads_back_bit_identical_tensors(tmp_path, buffer_bytes):
    ref = reference()
    with DiskStore(tmp_path, buffer_bytes=buffer_bytes) as store:
        run_with(store=store)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    # renamed into place, nothing half-written
    assert files and not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".tmp-*"))
    if buffer_bytes == 1:
        assert len(files) == 3 * len(POINTS)  # one file per flush
    reader = DiskStore(tmp_path)  # another process's view: only the directory
    assert reader.names() == sorted(POINTS)
    for name in POINTS:
        assert reader.steps(name) == [0, 1, 2]
        for step, tensor in enumerate(ref[name]):
            got = reader.read(name, step)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
            assert torch.equal(reader.read(name, step, batch=slice(1, 3)), tensor[1:3])
    reader.close()


def test_disk_store_editing_hooks_store_the_value_before_the_edit(tmp_path):
    def double(module, x, ctx, modules):
        return x * 2

    ref: dict = {}
    ref_logits = run_with(ref, edit=double, steps=1)
    with DiskStore(tmp_path) as store:
        logits = run_with(store=store, edit=double, steps=1)
        for name in POINTS:
            assert torch.equal(store.read(name, 0), ref[name][0])
    assert torch.equal(logits[0], ref_logits[0])


def test_merged_view_is_the_output_dict_and_half_written_files_are_invisible(tmp_path):
    ref = reference(steps=2)
    with DiskStore(tmp_path, buffer_bytes=1) as store:
        run_with(store=store, steps=2)
    # What a crash in the middle of a write leaves behind: a temporary file no index names.
    (tmp_path / ".rank0-000099.safetensors.tmp").write_bytes(b"half a file")
    merged = DiskStore(tmp_path).to_dict()
    assert merged.keys() == ref.keys()
    for name in ref:
        assert len(merged[name]) == len(ref[name])
        assert all(torch.equal(a, b) for a, b in zip(merged[name], ref[name]))
    store = MemoryStore()
    run_with(store=store, steps=2)
    assert all(torch.equal(a, b) for name in ref for a, b in zip(store.to_dict()[name], ref[name]))


def test_index_maps_every_tensor_to_its_file_and_key(tmp_path):
    with DiskStore(tmp_path, buffer_bytes=1) as store:
        run_with(store=store, steps=2)
    index = json.loads((tmp_path / "index-rank0.json").read_text())
    assert index["fingerprint"]["mesh"] == {"dp": 1, "pp": 1, "tp": 1}
    entry = index["entries"][0]
    assert {"name", "step", "micro_batch", "batch_start", "batch_stop", "writer", "file",
            "key", "shape", "dtype"} <= entry.keys()
    assert (tmp_path / entry["file"]).exists()


def test_reopened_store_continues_after_what_it_holds(tmp_path):
    ref = reference(steps=4)
    with DiskStore(tmp_path) as store:
        run_with(store=store, steps=2)
    with DiskStore(tmp_path) as store:  # the same model and mesh: appended
        run_with(store=store, steps=4)
    reader = DiskStore(tmp_path)
    assert reader.steps(POINTS[0]) == list(range(6))
    assert torch.equal(reader.read(POINTS[0], 1), ref[POINTS[0]][1])
    assert torch.equal(reader.read(POINTS[0], 5), ref[POINTS[0]][3])


def test_store_of_another_model_is_refused_and_left_intact(tmp_path):
    with DiskStore(tmp_path) as store:
        run_with(store=store, steps=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = tiny_hf_model("gpt2")
    with pytest.raises(StoreError, match="holds a run of"):
        FlexModel(other, None, store=DiskStore(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_read_of_unknown_hook_or_step_says_what_exists(tmp_path):
    with DiskStore(tmp_path) as store:
        run_with(store=store, steps=1)
        with pytest.raises(StoreError, match="nothing stored under 'nope'.*model.norm"):
            store.read("nope")
        with pytest.raises(StoreError, match=r"no step 7; stored steps: \[0\]"):
            store.read("model.norm", 7)
    with pytest.raises(StoreError, match="nothing stored"):
        MemoryStore().read("x")


def test_unwritable_directory_is_refused_at_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="not writable"):
        DiskStore(blocker / "store")


def test_full_disk_error_surfaces_and_keeps_what_was_written(tmp_path, monkeypatch):
    store = DiskStore(tmp_path, buffer_bytes=1)
    ones = torch.ones(4, 3)
    store.put("a", ones, WriteMeta(step=0))
    store.flush()
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def no_space(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_module, "save_file", no_space)
    store.put("a", ones * 2, WriteMeta(step=1))  # handed to the writer thread
    with pytest.raises(StoreError, match="No space left"):
        store.flush()
    with pytest.raises(StoreError, match="No space left"):  # never swallowed
        store.put("a", ones, WriteMeta(step=2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == written
    assert torch.equal(DiskStore(tmp_path).read("a", 0), ones)
    with pytest.raises(StoreError):
        store.close()


class _FailingStore(MemoryStore):
    """A MemoryStore whose ``put`` raises on the calls numbered in ``fail_on`` (0-based)."""

    def __init__(self, fail_on=(1,)):
        super().__init__()
        self.fail_on, self.calls = set(fail_on), 0

    def put(self, name, tensor, meta):
        call, self.calls = self.calls, self.calls + 1
        if call in self.fail_on:
            raise OSError(28, "No space left on device")
        super().put(name, tensor, meta)


def test_a_store_failing_in_a_hook_is_raised_at_the_end_of_the_forward():
    """The hook does not raise (distributed, the other ranks would wait in the forward's
    collectives); the forward finishes, stores nothing more, and raises the store's error."""
    store = _FailingStore(fail_on={1})
    model = tiny_hf_model("llama")
    flex = FlexModel(model, None, store=store)
    seen = []
    for name in POINTS:
        flex.register_forward_hook(HookFunction(name))
        flex.module.get_submodule(name).register_forward_hook(
            lambda m, a, o, n=name: seen.append(n))
    with pytest.raises(StoreError, match="storing 'model.layers.1' failed: OSError") as info:
        flex(**example_inputs("llama", batch=2, seed=0))
    assert isinstance(info.value.__cause__, OSError)
    assert seen == list(POINTS)  # the forward ran to its end
    assert store.calls == 2 and list(store.data) == [POINTS[0]]  # nothing after the failure
    flex(**example_inputs("llama", batch=2, seed=1))  # raised once: the next forward stores
    assert sorted(store.data) == sorted(POINTS) and store.calls == 5
    flex.check_store()  # nothing failed since
    flex.close()


def test_calls_after_a_failure_keep_their_step_numbers():
    store = _FailingStore(fail_on={1})  # the second put: model.layers.1's first call
    flex = FlexModel(tiny_hf_model("llama"), None, store=store)
    for name in POINTS:
        flex.register_forward_hook(HookFunction(name))
    with pytest.raises(StoreError):
        flex(**example_inputs("llama", batch=2, seed=0))
    flex(**example_inputs("llama", batch=2, seed=1))
    flex.close()
    # step = the number of earlier calls, whether or not they were stored
    assert {name: store.steps(name) for name in POINTS} == \
        {POINTS[0]: [0, 1], POINTS[1]: [1], POINTS[2]: [1]}


def test_a_disk_store_write_failing_in_the_background_is_raised_by_the_next_check(
        tmp_path, monkeypatch):
    """The write fails on the store's thread after the forward has returned, with no put
    after it: check_store() raises it anyway (and keeps raising: the store stays failed)."""
    forward_done = threading.Event()

    def no_space(tensors, path, metadata=None):
        forward_done.wait(30)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_module, "save_file", no_space)
    store = DiskStore(tmp_path, buffer_bytes=1)  # every put goes to the writer thread
    flex = FlexModel(tiny_hf_model("llama"), None, store=store)
    flex.register_forward_hook(HookFunction(POINTS[0]))
    flex(**example_inputs("llama", batch=2, seed=0))
    forward_done.set()
    store._queue.join()  # the write has failed
    for _ in range(2):
        with pytest.raises(StoreError, match="a buffer written in the background.*No space"):
            flex.check_store()
    flex.close()
    with pytest.raises(StoreError):
        store.close()


def test_a_store_failure_never_raised_is_named_at_close():
    store = _FailingStore(fail_on={0})
    flex = FlexModel(tiny_hf_model("llama"), None, store=store)
    flex.register_full_backward_hook(HookFunction("model.layers.1.mlp"))
    flex(**example_inputs("llama", batch=2, seed=0)).logits.pow(2).mean().backward()
    with pytest.warns(RuntimeWarning, match="never raised: call check_store"):
        flex.close()


def test_a_store_failing_in_a_backward_hook_is_raised_by_the_next_check():
    store = _FailingStore(fail_on={0})
    model = tiny_hf_model("llama")
    flex = FlexModel(model, None, store=store)
    flex.register_full_backward_hook(HookFunction("model.layers.1.mlp"))
    logits = flex(**example_inputs("llama", batch=2, seed=0)).logits
    logits.pow(2).mean().backward()  # the backward hook's put fails: nothing raised here
    with pytest.raises(StoreError, match="OSError"):
        flex.check_store()
    flex.check_store()  # raised once
    flex.close()


def test_a_mean_over_the_batch_missing_a_part_is_refused_on_read():
    """Two replicas' sums and row counts give the mean over the whole batch; a count missing
    (its put failed after the sum's) is an error, not a mean divided by something else."""
    store = MemoryStore()
    rows = [torch.ones(3, 2), 3 * torch.ones(1, 2)]  # replica 0: 3 rows, replica 1: 1 row
    for writer, r in enumerate(rows):
        meta = WriteMeta(step=0, batch_start=3 * writer, batch_stop=3 * writer + len(r),
                         batch_dim=0, writer=writer, batch_total=4)
        store.put("h", r.sum(0, keepdim=True), WriteMeta(**{**meta.__dict__, "kind": "sum"}))
        if writer == 0:
            store.put("h", torch.tensor(len(r)), WriteMeta(**{**meta.__dict__, "kind": "count"}))
    with pytest.raises(StoreError, match=r"sums from writers \[0, 1\] and row counts from "
                                         r"\[0\]"):
        store.read("h", 0)
    meta = WriteMeta(step=0, batch_start=3, batch_stop=4, batch_dim=0, writer=1, kind="count",
                     batch_total=4)
    store.put("h", torch.tensor(1), meta)
    assert torch.equal(store.read("h", 0), torch.cat(rows).mean(0, keepdim=True))


@pytest.mark.parametrize("reduce", ["mean_over_batch", "last_token"])
def test_reduce_follows_the_batch_dim_in_one_process(reduce):
    """``[seq, batch, hidden]`` with ``batch_dim=1`` (Megatron's order): the mean is over dim 1
    and the last token is the last row of dim 0 (before: batch_dim was ignored in one process,
    and last_token took the dim after the batch dim -- the hidden dim)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(5, 3, 4)
    store = MemoryStore()
    flex = FlexModel(model, None, store=store, batch_dim=1)
    flex.register_forward_hook(HookFunction("0", reduce=reduce))
    with torch.no_grad():
        y = flex(x)
    flex.close()
    want = y.mean(1, keepdim=True) if reduce == "mean_over_batch" else y[-1:]
    assert torch.equal(store.data["0"][0], want)


def test_host_memory_stays_bounded_by_the_buffer(tmp_path):
    store = DiskStore(tmp_path, buffer_bytes=1000)
    for step in range(50):
        store.put("a", torch.full((100,), float(step)), WriteMeta(step=step))  # 400 bytes
        assert store.host_bytes <= 2 * 1000 + 400
    store.close()
    assert store.host_bytes == 0
    assert torch.equal(DiskStore(tmp_path).read("a", 49), torch.full((100,), 49.0))


@pytest.mark.parametrize("reduce", ["mean_over_batch", "last_token", "callable"])
def test_reduce_equals_the_reduction_of_the_stored_tensor(tmp_path, reduce):
    fn = (lambda t: t.norm(dim=-1)) if reduce == "callable" else reduce
    ref = reference(steps=1)
    reduced: dict = {}
    run_with(reduced, steps=1, reduce=fn)
    with DiskStore(tmp_path) as store:
        run_with(store=store, steps=1, reduce=fn)
    for name in POINTS:
        full = ref[name][0]
        if reduce == "mean_over_batch":
            want = full.mean(0, keepdim=True)
        elif reduce == "last_token":
            want = full[:, -1:]
        else:
            want = full.norm(dim=-1)
        assert torch.equal(reduced[name][0], want)
        assert torch.equal(DiskStore(tmp_path).read(name, 0), want)


def test_bad_arguments_are_refused(tmp_path):
    model = tiny_hf_model("llama")
    with pytest.raises(ValueError, match="reduce must be one of"):
        HookFunction("model.norm", reduce="median")
    with pytest.raises(ValueError, match="not both"):
        FlexModel(model, {}, store=MemoryStore())
    with pytest.raises(TypeError, match="must implement"):
        FlexModel(model, None, store={})
    with pytest.raises(ValueError, match="buffer_bytes"):
        DiskStore(tmp_path, buffer_bytes=0)
    assert not os.path.exists(tmp_path / "store.json")


def test_store_page_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "store.md"
    namespace = {"__name__": "docs_example"}
    for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        exec(compile(block, str(page), "exec"), namespace)


def _rows_meta(step, start, stop, writer, total=4, kind="tensor"):
    return WriteMeta(step=step, batch_start=start, batch_stop=stop, batch_dim=0, writer=writer,
                     batch_total=total, kind=kind)


def test_a_read_refuses_pieces_that_do_not_tile_the_batch(tmp_path):
    """Writers 0 and 1 hold rows [0, 2) and [2, 4) of a batch of 4 (store_on="replica_leaders").
    Writer 1's piece of step 1 was lost (a crash before its buffer was written, a failed put):
    reading step 1 names the missing rows instead of returning writer 0's 2 rows as the batch."""
    rows = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3)
    for writer in (0, 1):
        with DiskStore(tmp_path, writer=writer) as store:
            store.attach({"model": "Net", "parameters": "x", "mesh": {"dp": 2, "pp": 1, "tp": 1}})
            for step in (0, 1):
                if writer == 1 and step == 1:
                    continue  # lost
                store.put("h", rows[2 * writer:2 * writer + 2].clone(),
                          _rows_meta(step, 2 * writer, 2 * writer + 2, writer))
    reader = DiskStore(tmp_path, writer=7)
    assert torch.equal(reader.read("h", 0), rows)  # complete step: the whole batch
    assert torch.equal(reader.read("h", 0, batch=slice(1, 3)), rows[1:3])
    with pytest.raises(StoreError, match=r"'h' step 1: rows \[0, 2\) .*do not tile a batch of "
                                         r"4: rows \[2, 4\) are missing"):
        reader.read("h", 1)

    store = MemoryStore()  # a gap: rows [0, 2) and [3, 4)
    store.put("g", rows[0:2], _rows_meta(0, 0, 2, 0))
    store.put("g", rows[3:4], _rows_meta(0, 3, 4, 1))
    with pytest.raises(StoreError, match=r"rows \[2, 3\) are missing"):
        store.read("g", 0)
    store.put("o", rows[0:3], _rows_meta(0, 0, 3, 0))  # an overlap: rows [0, 3) and [2, 4)
    store.put("o", rows[2:4], _rows_meta(0, 2, 4, 1))
    with pytest.raises(StoreError, match=r"rows \[2, 3\) are stored more than once"):
        store.read("o", 0)
    store.put("w", rows, WriteMeta(step=0))  # a whole tensor and rows of another run
    store.put("w", rows[2:4], _rows_meta(0, 2, 4, 1))
    with pytest.raises(StoreError, match="1 whole tensor.*calls of different runs"):
        store.read("w", 0)
    store.put("t", rows[0:2], _rows_meta(0, 0, 2, 0, total=4))  # different batch sizes
    store.put("t", rows[2:4], _rows_meta(0, 2, 4, 1, total=6))
    with pytest.raises(StoreError, match=r"different batch sizes \[4, 6\]"):
        store.read("t", 0)


def test_a_mean_over_the_batch_missing_a_replica_is_refused_on_read():
    """A mean over the batch from the sum and count of replica 0 only (replica 1's pair lost)
    is the mean of half the batch: refused, naming the rows."""
    store = MemoryStore()
    rows = torch.arange(8, dtype=torch.float64).reshape(4, 2)
    store.put("m", rows[:2].sum(0, keepdim=True), _rows_meta(0, 0, 2, 0, kind="sum"))
    store.put("m", torch.tensor(2), _rows_meta(0, 0, 2, 0, kind="count"))
    with pytest.raises(StoreError, match=r"'m' step 0: sums over rows \[0, 2\).*rows \[2, 4\) "
                                         r"are missing"):
        store.read("m", 0)
    store.put("m", rows[2:].sum(0, keepdim=True), _rows_meta(0, 2, 4, 1, kind="sum"))
    store.put("m", torch.tensor(2), _rows_meta(0, 2, 4, 1, kind="count"))
    assert torch.equal(store.read("m", 0), rows.mean(0, keepdim=True))


def test_a_store_written_before_totals_were_recorded_reads_as_before(tmp_path):
    """Index entries without ``batch_total`` (an older store): rows that follow one another from
    row 0 are read as before (where the batch ends is unknown); a gap is still refused."""
    rows = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    with DiskStore(tmp_path, writer=0) as store:
        store.put("h", rows[:2].clone(), _rows_meta(0, 0, 2, 0))
        store.put("h", rows[2:].clone(), _rows_meta(0, 2, 4, 0))
        store.put("h", rows[:2].clone(), _rows_meta(1, 0, 2, 0))
        store.put("h", rows[3:].clone(), _rows_meta(1, 3, 4, 0))
    path = tmp_path / "index-rank0.json"
    index = json.loads(path.read_text())
    assert all(e["batch_total"] == 4 for e in index["entries"])
    for entry in index["entries"]:
        del entry["batch_total"]
    path.write_text(json.dumps(index))
    reader = DiskStore(tmp_path, writer=3)
    assert torch.equal(reader.read("h", 0), rows)
    with pytest.raises(StoreError, match=r"rows \[2, 3\) are missing"):
        reader.read("h", 1)


def test_a_reused_memory_store_continues_after_its_steps():
    """A second FlexModel on the same MemoryStore numbers its calls after the stored ones
    (before: from 0 again, two calls under one step)."""
    ref = reference(steps=2)
    store = MemoryStore()
    run_with(store=store, steps=1)
    run_with(store=store, steps=2)
    assert store.steps(POINTS[0]) == [0, 1, 2]
    assert torch.equal(store.read(POINTS[0], 2), ref[POINTS[0]][1])


def _not_a_tensor(t):
    return t.norm(dim=-1).tolist()


def test_a_reduce_that_fails_is_a_store_failure_with_a_store():
    """One process: with store= a reduction that raises is a failure of the store (StoreError
    at the end of the forward, as distributed, where every rank raises it there); without a
    store it raises at the call. A named reduction that cannot apply raises at the call."""
    store = MemoryStore()
    flex = FlexModel(tiny_hf_model("llama"), None, store=store)
    flex.register_forward_hook(HookFunction("model.norm", reduce=_not_a_tensor))
    flex.register_forward_hook(HookFunction("model.layers.1.mlp"))
    with pytest.raises(StoreError, match="storing 'model.norm' failed: TypeError: a reduce "
                                         "callable must return a tensor"):
        flex(**example_inputs("llama", batch=2, seed=0))
    assert store.names() == ["model.layers.1.mlp"]  # it ran before model.norm
    flex.close()
    flex = FlexModel(tiny_hf_model("llama"), {})
    flex.register_forward_hook(HookFunction("model.norm", reduce=_not_a_tensor))
    with pytest.raises(TypeError, match="must return a tensor"):
        flex(**example_inputs("llama", batch=2, seed=0))
    flex.close()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    flex = FlexModel(model, None, store=MemoryStore())
    flex.register_forward_hook(HookFunction("0", reduce="last_token"))
    with pytest.raises(ValueError, match="last_token needs a batch dim and a sequence dim"):
        flex(torch.randn(4))  # one dim: no sequence dim
    flex.close()
