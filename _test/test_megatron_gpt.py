"""A real Megatron-core ``GPTModel`` (local layer spec, 2 layers) at TP=2, with and without
sequence parallelism, on two CPU ranks (and dp=2 x tp=2 on four): its forward and backward
equal the TP=1 model with the same full weights; under FlexModel (Megatron's groups adopted, no
sizes given) hooks on its blocks, its tensor-parallel layers and its embeddings retrieve and
edit the whole tensors of the TP=1 model; ``SurgicalTheater`` / ``MaskTheater`` edits on its
shards give the TP=1 model's logits and restore bit-exactly; ``full_weights`` is its TP=1 state."""

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    DATA_PARALLEL_SITES,
    EDIT_SITES,
    HIDDEN,
    RETRIEVAL_SITES,
    WORD_EMBEDDINGS,
    build_gpt,
    data_parallel_rows,
    forward_backward,
    full_tensors,
    gpt_inputs,
    gpt_parallel,
    local_group,
    run_flex,
    stored_mismatches,
)
from rank_pool import distributed

from flex_surgery.parallel.frameworks import UnknownLayoutError

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

TOL = dict(rtol=1e-9, atol=1e-11)  # float64; TP changes only the summation order


def _reference() -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Whole weights, logits and gradients of the TP=1 model (the one-process twin)."""
    with gpt_parallel(tp=1):
        model = build_gpt(tp=1)
        logits, grads = forward_backward(model)
        return full_tensors(model), logits, grads


def _assert_all_close(got: dict, want: dict, what: str, **tol) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key in want:
        assert got[key].shape == want[key].shape, (what, key, got[key].shape, want[key].shape)
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{what} {k}: {m}",
                                   **tol)


@distributed(world_size=2)
def test_megatron_gpt_tp2_equals_tp1():
    ref_weights, ref_logits, ref_grads = _reference()
    for sp in (False, True):
        with gpt_parallel(tp=2):
            model = build_gpt(tp=2, sequence_parallel=sp)
            weights = full_tensors(model)
            logits, grads = forward_backward(model)
        assert dist.get_world_size() == 2
        _assert_all_close(weights, ref_weights, f"sp={sp} weight", rtol=0, atol=0)
        torch.testing.assert_close(logits, ref_logits, **TOL)
        _assert_all_close(grads, ref_grads, f"sp={sp} grad", **TOL)


# -- under FlexModel: Megatron's groups adopted, no sizes given ---------------------------------
def _flex_reference(sites, edit: bool):
    """What FlexModel on the TP=1 twin (one-process runtime) stores, its logits and grads."""
    with gpt_parallel(tp=1):
        stored, logits, grads, _ = run_flex(build_gpt(tp=1), sites, edit, local_group())
    return stored, logits, grads


@distributed(world_size=2)
def test_megatron_gpt_last_token_takes_each_sites_own_sequence_dim():
    """``reduce="last_token"`` on a batch-first site (the word embeddings, ``[b, s, h]``) and a
    ``[s, b, h]`` one (a block) at TP=2: each keeps its own last position, equal to the TP=1
    tensors sliced by hand. Before, the model-wide batch dim 1 was used for both."""
    from flex_surgery import FlexModel, HookFunction

    sites = [WORD_EMBEDDINGS, ("decoder.layers.0", "forward", 0)]
    ref, _, _ = _flex_reference(sites, edit=False)
    stored: dict = {}
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2)
        flex = FlexModel(model, stored)
        for name, _, idx in sites:
            flex.register_forward_hook(HookFunction(name, unpack_idx=idx, reduce="last_token"))
        forward_backward(model, wrapper=flex)
        flex.restore()
    if dist.get_rank() == 0:
        emb, block = ref[WORD_EMBEDDINGS[0]][0], ref["decoder.layers.0"][0]
        torch.testing.assert_close(stored[WORD_EMBEDDINGS[0]][0], emb[:, -1:], **TOL)
        torch.testing.assert_close(stored["decoder.layers.0"][0], block[-1:], **TOL)


@distributed(world_size=2)
def test_flexmodel_adopts_megatron_groups_and_gives_whole_parameters():
    """No sizes given: the mesh is Megatron's (tp=2, not dp=2), and ``get_module_parameter``
    of column-, row-, vocab-parallel and replicated parameters is the TP=1 parameter."""
    from flex_surgery import FlexModel

    names = ["decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.0.self_attention.linear_qkv.bias",
             "decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.0.mlp.linear_fc2.bias",
             "embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
             "output_layer.weight"]
    with gpt_parallel(tp=1):
        ref_weights = full_tensors(build_gpt(tp=1))
    with gpt_parallel(tp=2):
        flex = FlexModel(build_gpt(tp=2), None)
        mesh = flex.runtime.mesh
        whole = {n: flex.get_module_parameter(n) for n in names}
        flex.restore()
    assert (mesh.source, mesh.sizes) == ("megatron", {"dp": 1, "tp": 2, "pp": 1}), mesh
    _assert_all_close(whole, {n: ref_weights[n] for n in names}, "get_module_parameter",
                      rtol=0, atol=0)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_megatron_gpt_retrieval_equals_tp1(sequence_parallel):
    """Forward, forward-pre (keyword-only blocks), full backward (pre) and gradient hooks on
    blocks, column-/row-parallel layers, the core attention and the embeddings store the TP=1
    tensors; the logits and gradients are unchanged."""
    sites = RETRIEVAL_SITES + [WORD_EMBEDDINGS]
    ref_stored, ref_logits, ref_grads = _flex_reference(sites, edit=False)
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel)
        stored, logits, grads, _ = run_flex(model, sites, edit=False)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    _assert_all_close(grads, ref_grads, "grad", **TOL)
    if dist.get_rank() == 0:
        # every site stored one tensor (hooks of several kinds on one module may share a key)
        assert sum(map(len, ref_stored.values())) == len(sites), sorted(ref_stored)
        problems = stored_mismatches(stored, ref_stored, **TOL)
        assert not problems, "\n".join(problems)
    else:
        assert stored == {}


@pytest.mark.parametrize("edit", [True, "replicated"], ids=["leader", "replicated"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_megatron_gpt_editing_equals_tp1(sequence_parallel, edit):
    """Edits (doubling, or doubling plus a position-dependent term) on every kind of site:
    logits and whole gradients of TP=1 with the same edits, run on the edit leader and
    scattered, or run on every rank on its all-gathered copy (``replicate_edit``)."""
    _, ref_logits, ref_grads = _flex_reference(EDIT_SITES, edit=True)
    _, plain_logits, _ = _flex_reference([], edit=False)
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel)
        _, logits, grads, _ = run_flex(model, EDIT_SITES, edit=edit)
    assert not torch.allclose(ref_logits, plain_logits)  # the edits change the logits
    torch.testing.assert_close(logits, ref_logits, **TOL)
    _assert_all_close(grads, ref_grads, "grad", **TOL)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=4)
def test_megatron_gpt_dp2_tp2_equals_tp1(sequence_parallel):
    """Megatron's dp=2 x tp=2 grid (ranks ordered (pp, dp, tp)), each replica running its half
    of the batch as DDP would: retrieval stores the TP=1 tensors of the whole batch (batch on
    dim 1 of Megatron's activations), edits give the TP=1 logits of its rows and the whole
    gradients. A block's second input (the attention mask) is refused without a declared
    shape."""
    with gpt_parallel(tp=1):
        ref_stored, ref_logits, ref_grads, _ = run_flex(build_gpt(tp=1), DATA_PARALLEL_SITES,
                                                        False, local_group())
        _, ref_edited, ref_edited_grads, _ = run_flex(build_gpt(tp=1), EDIT_SITES, True,
                                                      local_group())
    with gpt_parallel(tp=2):
        rows = data_parallel_rows()
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel)
        stored, logits, grads, mesh = run_flex(model, DATA_PARALLEL_SITES, False,
                                               data_parallel=True)
        _, edited, edited_grads, _ = run_flex(model, EDIT_SITES, True, data_parallel=True)
        # a block's attention mask ([b, 1, s, s], or broadcast [1, 1, s, s]): its batch dim is
        # not the activations' dim 1, and nothing says where it is -- an error, not a guess
        with pytest.raises(UnknownLayoutError, match="(?s)input of .*decoder"):
            run_flex(build_gpt(tp=2, sequence_parallel=sequence_parallel),
                     [("decoder", "forward_pre", 1)], False, data_parallel=True)
    assert (mesh.source, mesh.sizes) == ("megatron", {"dp": 2, "tp": 2, "pp": 1}), mesh
    assert rows != slice(0, 2)  # each replica has part of the batch
    torch.testing.assert_close(logits, ref_logits[rows], **TOL)
    _assert_all_close(grads, ref_grads, "grad", **TOL)
    torch.testing.assert_close(edited, ref_edited[rows], **TOL)
    _assert_all_close(edited_grads, ref_edited_grads, "edited grad", **TOL)
    if dist.get_rank() == 0:
        problems = stored_mismatches(stored, ref_stored, **TOL)
        assert not problems, "\n".join(problems)
    else:
        assert stored == {}


# -- SurgicalTheater on each rank's shard -----------------------------------------------------
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"  # column-parallel, [3h, h]
FC2 = "decoder.layers.0.mlp.linear_fc2.weight"             # row-parallel, [h, ff]
WORDS = "embedding.word_embeddings.weight"                 # vocab-parallel, [V, h]
MLP1 = ["decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight"]


def _zero_rows(p, rows):
    """A delta that zeroes whole rows of the full parameter (spanning both shards of QKV)."""
    delta = torch.zeros_like(p)
    delta[rows] = -p[rows]
    return delta


def _remove_top_singular_direction(p):
    """A delta that needs the whole matrix: minus its top singular component."""
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    return -s[0] * torch.outer(u[:, 0], vh[0])


def _masks():
    g = torch.Generator().manual_seed(5)
    return {QKV: torch.rand(3 * HIDDEN, HIDDEN, generator=g) > 0.3,  # boolean
            FC2: torch.rand(HIDDEN, 4 * HIDDEN, generator=g, dtype=torch.float64)}  # continuous


# name -> (theater arguments, the parameters it modifies; None: not checked by name)
THEATERS = {
    "scale": (dict(layers="decoder.layers.1.mlp", modification_type="scale", factor=0.5), MLP1),
    # seeded: the full-shape noise of one process, cut to each shard
    "noise": (dict(layers="decoder.layers.1.mlp", modification_type="noise", noise_scale=0.5,
                   seed=3), MLP1),
    "noise_all_parameters": (dict(modification_type="noise", noise_scale=0.1, seed=1,
                                  params="all"), None),
    "disable_attention": (dict(layers="decoder.layers.0.self_attention",
                               modification_type="disable"), None),
    "zero_rows_full_parameter": (dict(layers=[QKV, WORDS], modification_type="custom",
                                      modification_fn=_zero_rows, rows=[5, 100],
                                      full_parameter=True), sorted([QKV, WORDS])),
    "svd_full_parameter": (dict(layers=[FC2], modification_type="custom",
                                modification_fn=_remove_top_singular_direction,
                                full_parameter=True), [FC2]),
    "masks": (None, sorted([QKV, FC2])),
}


def _theater_logits(model, case: str):
    """Logits inside the theater ``case``, the names it modified, and whether every parameter
    is bit-identical after it."""
    from flex_surgery.surgery import MaskTheater, SurgicalTheater

    arguments, _ = THEATERS[case]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    theater = MaskTheater(model, _masks()) if arguments is None else \
        SurgicalTheater(model, **arguments)
    with theater, torch.no_grad():
        logits = model(*gpt_inputs()).cpu()
    restored = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    return logits, sorted(theater.modified_names), restored


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("case", list(THEATERS))
@distributed(world_size=2)
def test_megatron_gpt_theater_equals_tp1(case, sequence_parallel):
    """Each modification made on each rank's shard (elementwise, seeded noise cut from the
    full-shape noise, full-parameter functions, full-shape masks) gives the TP=1 logits with
    the same modification; every parameter is bit-identical afterwards."""
    with gpt_parallel(tp=1):
        model = build_gpt(tp=1)
        with torch.no_grad():
            plain = model(*gpt_inputs()).cpu()
        ref_logits, ref_names, _ = _theater_logits(model, case)
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel)
        logits, names, restored = _theater_logits(model, case)
    expected_names = THEATERS[case][1]
    if expected_names is not None:
        assert ref_names == expected_names, ref_names
    assert names == ref_names
    assert not torch.allclose(ref_logits, plain)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert restored


@distributed(world_size=2)
def test_megatron_gpt_export_full_weights_equal_tp1():
    """``full_weights`` of the TP=2 model (Megatron's TP group found by itself) is the TP=1
    model's state, parameter for parameter and buffer for buffer."""
    from flex_surgery.export import full_weights

    with gpt_parallel(tp=1):
        ref = full_weights(build_gpt(tp=1))
    with gpt_parallel(tp=2):
        got = full_weights(build_gpt(tp=2))
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    wrong = [(k, tuple(got[k].shape), tuple(ref[k].shape)) for k in ref
             if got[k].shape != ref[k].shape or not torch.equal(got[k], ref[k])]
    assert not wrong, wrong
