"""The logit lens equals a hand-computed one-process lens, and sharded runs equal the one-process
lens of the same weights: HF ``tp_plan`` (vocabulary-parallel ``lm_head``), fairscale
``ColumnParallelLinear`` / tied ``VocabParallelEmbedding`` / replicated heads, data parallelism,
and hand-split pipeline stages. Bad input is a clear error that leaves no hook behind."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_cases import Block, local_group, seeded_linear
from rank_pool import destroy_fairscale_model_parallel, distributed
from torch import nn

from flex_surgery.anatomy import Anatomy, UnknownArchitecture, register_anatomy
from flex_surgery.lens import LensError, LensResult, LogitLens, logit_lens, plot_lens
from flex_surgery.models import example_inputs, tiny_hf_model

H, FF, V, N_BLOCKS = 16, 32, 20, 4
TOL = dict(rtol=1e-5, atol=1e-5)


class LensTinyLM(nn.Module):
    """Embedding -> blocks -> norm -> head, any part optional (a pipeline stage holds some).
    A head that is an embedding is tied: logits = h @ weight.T, gathered over TP when it is a
    ``VocabParallelEmbedding``."""

    def __init__(self, embed, blocks, norm, head) -> None:
        super().__init__()
        self.embed, self.blocks, self.norm, self.head = embed, nn.ModuleList(blocks), norm, head

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is None:
            return x
        h = self.norm(x)
        if type(self.head).__name__ == "VocabParallelEmbedding":
            from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region

            return gather_from_model_parallel_region(F.linear(h, self.head.weight))
        if isinstance(self.head, nn.Embedding):
            return F.linear(h, self.head.weight)
        return self.head(h)


register_anatomy("LensTinyLM", Anatomy("blocks", "norm", "embed", "head"))


def plain_lm(seed: int = 0, tied: bool = False) -> LensTinyLM:
    g = torch.Generator().manual_seed(seed)

    def linear(i, o):
        return seeded_linear(i, o, g)

    embed = nn.Embedding(V, H)
    norm = nn.LayerNorm(H)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(V, H, generator=g))
        norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
        norm.bias.copy_(0.1 * torch.randn(H, generator=g))
    blocks = [Block(linear(H, FF), linear(FF, H)) for _ in range(N_BLOCKS)]
    return LensTinyLM(embed, blocks, norm, embed if tied else linear(H, V)).eval()


def fairscale_lm(plain: LensTinyLM, head: str) -> LensTinyLM:
    """The same weights with fairscale TP blocks and a ``head`` of kind "column" (a
    ColumnParallelLinear), "vocab" (tied VocabParallelEmbedding) or "replicated" (plain)."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    tp, r = fs.get_model_parallel_world_size(), fs.get_model_parallel_rank()
    f, v = FF // tp, V // tp
    blocks = []
    for b in plain.blocks:
        up = ColumnParallelLinear(H, FF, gather_output=False)
        down = RowParallelLinear(FF, H, input_is_parallel=True)
        with torch.no_grad():
            up.weight.copy_(b.up.weight[r * f:(r + 1) * f])
            up.bias.copy_(b.up.bias[r * f:(r + 1) * f])
            down.weight.copy_(b.down.weight[:, r * f:(r + 1) * f])
            down.bias.copy_(b.down.bias)
        blocks.append(Block(up, down))
    embed = VocabParallelEmbedding(V, H)
    with torch.no_grad():
        embed.weight.copy_(plain.embed.weight[r * v:(r + 1) * v])
    if head == "column":
        out = ColumnParallelLinear(H, V, gather_output=True)
        with torch.no_grad():
            out.weight.copy_(plain.head.weight[r * v:(r + 1) * v])
            out.bias.copy_(plain.head.bias[r * v:(r + 1) * v])
    elif head == "vocab":
        out = embed
    else:
        out = plain.head
    return LensTinyLM(embed, blocks, plain.norm, out).eval()


def reference_lens(model: LensTinyLM, ids: torch.Tensor, k: int, translators=None):
    """By hand, in one process: top-k of log_softmax(head(norm(h_i [+ T_i(h_i)]))), ties
    broken by the smaller id (:func:`rule_topk`)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    with torch.no_grad():
        logits = model(ids)
        for h in hooks:
            h.remove()
        tops = []
        for i, h in enumerate(outs):
            if translators and i in translators:
                h = h + translators[i](h)
            w = model.head.weight
            b = getattr(model.head, "bias", None) if isinstance(model.head, nn.Linear) else None
            tops.append(rule_topk(F.linear(model.norm(h), w, b), k))
    tokens = torch.stack([t[0] for t in tops])
    logprobs = torch.stack([t[1] for t in tops])
    return tokens, logprobs, logits


def rule_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule by hand: the k largest logits, ties broken by the smaller id, a NaN
    above any number (a stable descending sort of the whole vocabulary); with log-probs."""
    ids = logits.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return ids, logits.log_softmax(-1).gather(-1, ids)


def assert_same(got: LensResult, tokens, logprobs) -> None:
    assert got.tokens.shape == tokens.shape, (got.tokens.shape, tokens.shape)
    assert torch.equal(got.tokens, tokens), (got.tokens - tokens).abs().max()
    torch.testing.assert_close(got.logprobs, logprobs, **TOL)


def ids_for(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 5, V])
def test_one_process_equals_hand_computed_lens(tied, k):
    model = plain_lm(tied=tied)
    ids = ids_for()
    tokens, logprobs, logits = reference_lens(model, ids, k)
    got = logit_lens(model, ids, top_k=k)
    assert got.layers == list(range(N_BLOCKS))
    assert_same(got, tokens, logprobs)
    # The last block's lens is the model's own prediction.
    assert torch.equal(got.tokens[-1, ..., 0], logits.argmax(-1))
    assert not any(b._forward_hooks for b in model.blocks)  # no hook left behind


def test_rows_decoded_in_chunks_equal_one_matmul(monkeypatch):
    model, ids = plain_lm(), ids_for(batch=3, seq=5)
    tokens, logprobs, _ = reference_lens(model, ids, 4)
    monkeypatch.setattr(LogitLens, "CHUNK_ELEMENTS", 7 * V)  # 7 of the 60 rows per matmul
    assert_same(logit_lens(model, ids, top_k=4), tokens, logprobs)


# -- ties: the k largest, ties broken by the smaller token id, in every layout ----------------
class _TieLM(nn.Module):
    """Embedding -> one block -> head whose logits tie: weight 0, bias [0, 1, 1, 1, 1, 0, 1, 0]
    (the second reader's case: torch.topk picked ids 1 and 6 among the tied 1, 2, 3, 4, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.head = nn.Linear(4, 8)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0., 1, 1, 1, 1, 0, 1, 0]))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


register_anatomy("_TieLM", Anatomy("blocks", None, "embed", "head"))


def test_lens_ties_are_broken_by_the_smaller_token_id():
    model = _TieLM().eval()
    lens = logit_lens(model, torch.tensor([[0, 1, 2]]), top_k=2)
    assert lens.tokens[0, 0, 0].tolist() == [1, 2], lens.tokens[0, 0, 0].tolist()
    assert lens.tokens[..., 0].eq(1).all()


TIE_BIASES = ("zero", "nan", "-inf")


def tie_lm(bias: str) -> LensTinyLM:
    """plain_lm with a head whose logits tie, differently at every position: row v of the weight
    is one-hot at column v % 4, so logit v is exactly h[v % 4] + bias[v] -- ids 0, 4, 8, 12, 16
    tie, and so on (spread over both halves of the vocabulary). ``bias``: "zero"; "nan" (ids 3,
    7, 13 and 17 are NaN everywhere: above any number); "-inf" (ids 0..9, a whole half of the
    vocabulary, are -inf: top_k = 12 must report ids 0 and 1, not a rank's padding)."""
    model = plain_lm()
    weight = torch.zeros(V, H)
    weight[torch.arange(V), torch.arange(V) % 4] = 1
    b = torch.zeros(V)
    if bias == "nan":
        b[[3, 7, 13, 17]] = float("nan")
    elif bias == "-inf":
        b[:V // 2] = -float("inf")
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(b)
    return model


def assert_same_ties(got: LensResult, tokens, logprobs) -> None:
    assert torch.equal(got.tokens, tokens), (got.tokens, tokens)
    torch.testing.assert_close(got.logprobs, logprobs, equal_nan=True, **TOL)


@pytest.mark.parametrize("bias", TIE_BIASES)
def test_tied_logits_follow_the_smaller_id_rule_and_the_models_argmax(bias, monkeypatch):
    model, ids = tie_lm(bias), ids_for()
    with torch.no_grad():
        logits = model(ids)
    for k in (1, 3, 12, V):
        tokens, logprobs, _ = reference_lens(model, ids, k)
        assert_same_ties(logit_lens(model, ids, top_k=k), tokens, logprobs)
    # The last block's top-1 is the model's argmax (the first maximum, a NaN first).
    assert torch.equal(logit_lens(model, ids, top_k=1).tokens[-1, ..., 0], logits.argmax(-1))
    if bias == "nan":  # NaN ids first, smaller first; a row with a NaN has NaN log-probs
        got = logit_lens(model, ids, top_k=5)
        assert got.tokens[..., :4].eq(torch.tensor([3, 7, 13, 17])).all()
        assert got.logprobs.isnan().all()
    monkeypatch.setattr(LogitLens, "CHUNK_ELEMENTS", 7 * V)  # chunks: the same answer
    tokens, logprobs, _ = reference_lens(model, ids, 3)
    assert_same_ties(logit_lens(model, ids, top_k=3), tokens, logprobs)


@pytest.mark.parametrize("slack", [64, 2, 0])
def test_local_candidates_follow_the_rule_under_any_vocabulary_split(slack, monkeypatch):
    """bf16-like logits (few distinct values, with NaN and +-inf) split over 1, 2 or 3 ranks,
    evenly or not: each rank's local_topk and merge_topk give the rule's answer exactly --
    whether the ties are resolved among topk's extra candidates or by a pass over the row
    (``slack`` below the number of tied ids)."""
    import math

    from flex_surgery import lens_unembedding as lu

    monkeypatch.setattr(lu, "_TIE_SLACK", slack)
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n, rows = int(torch.randint(1, 40, (1,), generator=g)), 4
        w = torch.randint(-3, 4, (n, 1), generator=g).float()
        w[torch.rand(n, 1, generator=g) < 0.1] = math.nan
        w[torch.rand(n, 1, generator=g) < 0.1] = -math.inf
        w[torch.rand(n, 1, generator=g) < 0.05] = math.inf
        h = torch.randint(1, 3, (rows, 1), generator=g).float()  # logits = h * w: exact
        logits = F.linear(h, w)
        k = int(torch.randint(1, n + 3, (1,), generator=g))
        tp = int(torch.randint(1, 4, (1,), generator=g))
        cuts = sorted(torch.randint(0, n + 1, (tp - 1,), generator=g).tolist())
        packs = [lu.local_topk(lu._Unembedding(w[a:b], None, a, n), h, k, 2 * n)
                 for a, b in zip([0] + cuts, cuts + [n])]
        mesh = type("Mesh", (), {"tp_size": tp, "group": lambda self, axis: None})()
        monkeypatch.setattr(lu.dist, "all_gather",
                            lambda out, t, group=None, packs=packs: out.__setitem__(
                                slice(None), packs))
        ids, _ = lu.merge_topk(packs[0], k, mesh if tp > 1 else None)
        want, _ = rule_topk(logits, k)
        assert torch.equal(ids[:, :min(k, n)], want), (trial, logits, k, cuts, ids, want)
        assert ids[:, n:].eq(-1).all()  # k above the vocabulary: padding, last


def test_layers_positions_and_translators():
    model = plain_lm()
    ids = ids_for()
    g = torch.Generator().manual_seed(3)
    translators = {1: nn.Linear(H, H), -1: nn.Linear(H, H)}
    for t in translators.values():
        with torch.no_grad():
            t.weight.copy_(0.3 * torch.randn(H, H, generator=g))
    tokens, logprobs, _ = reference_lens(model, ids, 3, {1: translators[1], 3: translators[-1]})
    got = logit_lens(model, ids, layers=[3, 1], top_k=3, translators=translators,
                     positions=[-1, 0])
    assert got.layers == [3, 1]
    assert_same(got, tokens[[3, 1]][:, :, [-1, 0]], logprobs[[3, 1]][:, :, [-1, 0]])
    toks, lps = got.at(1)
    assert torch.equal(toks, tokens[1][:, [-1, 0]])
    # A zero translator is the identity (tuned lens initialisation).
    zero = nn.Linear(H, H)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    plain = logit_lens(model, ids, top_k=3)
    same = logit_lens(model, ids, top_k=3, translators={2: zero})
    assert torch.equal(plain.tokens, same.tokens) and torch.equal(plain.logprobs, same.logprobs)


def test_hf_llama_lens_and_repeated_calls():
    model = tiny_hf_model("llama", num_hidden_layers=3)
    ids = example_inputs("llama", batch=2, seq=6)["input_ids"]
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.model.layers]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for h in hooks:
            h.remove()
        want = [model.lm_head(model.model.norm(o)).log_softmax(-1).topk(4) for o in outs]
    with LogitLens(model, top_k=4) as lens:
        for _ in range(2):  # residuals of one call do not leak into the next
            got = lens(input_ids=ids)
            assert_same(got, torch.stack([w.indices for w in want]),
                        torch.stack([w.values for w in want]))
    assert torch.equal(got.tokens[-1, ..., 0], logits.argmax(-1))
    assert not any(b._forward_hooks for b in model.model.layers)


def test_bert_masked_lm_lens_decodes_through_the_head_transform():
    """BertForMaskedLM's head runs dense, activation and LayerNorm before its decoder: the last
    block's lens is the model's own prediction (before: the decoder on the raw residual)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    model = tf.BertForMaskedLM(config).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with LogitLens(model, top_k=3) as lens:
        got = lens(input_ids=ids)
    want = logits.log_softmax(-1).topk(3)
    assert torch.equal(got.tokens[-1], want.indices)
    torch.testing.assert_close(got.logprobs[-1], want.values, rtol=1e-5, atol=1e-5)


def test_lens_on_a_model_wrapped_by_a_flexmodel_sees_its_edits():
    from flex_surgery import FlexModel, HookFunction

    ids = ids_for()
    doubled = plain_lm()
    handle = doubled.blocks[1].register_forward_hook(lambda m, a, o: o * 2)
    tokens, logprobs, _ = reference_lens(doubled, ids, 4)
    handle.remove()
    model = plain_lm()
    flex = FlexModel(model, {})
    try:
        flex.register_forward_hook(HookFunction("blocks.1", editing_function=lambda m, t, c, x:
                                                t * 2))
        got = logit_lens(flex, ids, top_k=4)
    finally:
        flex.restore()
    assert_same(got, tokens, logprobs)
    assert not torch.equal(got.tokens, logit_lens(model, ids, top_k=4).tokens)


def test_bad_input_is_a_clear_error_and_leaves_no_hook(tmp_path):
    bare = tiny_hf_model("llama")  # with a head, but asked about a bare encoder below
    with pytest.raises(LensError, match="no unembedding"):
        LogitLens(bare.model)  # LlamaModel: no LM head
    with pytest.raises(UnknownArchitecture, match="known"):
        LogitLens(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(IndexError, match="2 blocks"):
        LogitLens(bare, layers=[0, 2])
    with pytest.raises(ValueError, match="twice"):
        LogitLens(bare, layers=[1, -1])
    with pytest.raises(ValueError, match="top_k"):
        LogitLens(bare, top_k=0)
    with pytest.raises(ValueError, match="does not read"):
        LogitLens(bare, layers=[0], translators={1: nn.Identity()})
    assert not any(m._forward_hooks for m in bare.modules())
    with LogitLens(bare) as lens, pytest.raises(LensError, match="did not run"):
        lens.result()  # nothing ran yet


def test_plot_writes_a_png(tmp_path):
    model = plain_lm()
    got = logit_lens(model, ids_for(batch=1, seq=4), top_k=2)
    path = plot_lens(got, tmp_path / "lens.png", decode=lambda i: f"t{i}",
                     input_tokens=["a", "b", "c", "d"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- sharded equals one process ----------------------------------------------------------
@distributed(world_size=2)
def test_hf_tp_plan_vocab_parallel_head_equals_one_process(tmp_path):
    import transformers as tf
    from torch.distributed.tensor import DTensor

    for tied in (False, True):
        folder = tmp_path / f"tiny-llama-{tied}"
        if dist.get_rank() == 0:
            tiny_hf_model("llama", num_hidden_layers=3, tie_word_embeddings=tied).save_pretrained(
                folder)
        dist.barrier()
        ids = example_inputs("llama", batch=2, seq=6)["input_ids"]
        ref = logit_lens(tiny_hf_model("llama", num_hidden_layers=3, tie_word_embeddings=tied),
                         {"input_ids": ids}, top_k=5, process_group=local_group())
        model = tf.LlamaForCausalLM.from_pretrained(
            folder, distributed_config=tf.DistributedConfig(tp_plan="auto"),
            dtype=torch.float32).eval()
        assert isinstance(model.lm_head.weight, DTensor)
        with LogitLens(model, top_k=5) as lens:
            assert lens._unembed.weight.shape[0] == 64  # this rank's half of the vocabulary
            got = lens(input_ids=ids)
        assert_same(got, ref.tokens, ref.logprobs)


@pytest.mark.parametrize("head", ["column", "vocab", "replicated"])
@distributed(world_size=2)
def test_fairscale_heads_equal_one_process(head):
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        plain = plain_lm(tied=head == "vocab")
        ids = ids_for()
        for k in (3, 12):  # 12 > V / tp: fewer candidates than k on each rank
            tokens, logprobs, _ = reference_lens(plain, ids, k)
            model = fairscale_lm(plain, head)
            with LogitLens(model, top_k=k, tensor_parallel_size=2) as lens:
                assert lens._unembed.weight.shape[0] == V // 2
                got = lens(ids)
            assert_same(got, tokens, logprobs)
    finally:
        destroy_fairscale_model_parallel()


@pytest.mark.parametrize("bias", TIE_BIASES)
@distributed(world_size=2)
def test_tied_logits_under_tensor_parallelism_equal_one_process(bias):
    """Ties spread over both vocabulary halves: each rank's candidates are its k best under the
    smaller-id rule, so TP=2 reports the one-process ids (and the rule's) for every k."""
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        plain, ids = tie_lm(bias), ids_for()
        for head in ("column", "replicated"):
            for k in (1, 3, 12, V):  # 12 > V / tp
                tokens, logprobs, _ = reference_lens(plain, ids, k)
                one = logit_lens(plain, ids, top_k=k, process_group=local_group())
                assert_same_ties(one, tokens, logprobs)
                with LogitLens(fairscale_lm(plain, head), top_k=k,
                               tensor_parallel_size=2) as lens:
                    assert lens._unembed.weight.shape[0] == V // 2
                    assert_same_ties(lens(ids), tokens, logprobs)
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=2)
def test_a_plain_head_that_differs_across_ranks_is_an_error():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        model = fairscale_lm(plain_lm(), "replicated")
        model.head = nn.Linear(H, V // 2)  # a hand-made shard nothing declares
        with torch.no_grad():
            model.head.weight.fill_(dist.get_rank())
        with pytest.raises(LensError, match="differs across tensor-parallel ranks"):
            LogitLens(model, tensor_parallel_size=2)
        assert not any(m._forward_hooks for m in model.blocks)
        # Same shape, sum and sum of squares, rows in another order on rank 1.
        model.head = plain_lm().head
        if dist.get_rank() == 1:
            with torch.no_grad():
                model.head.weight.copy_(model.head.weight.flip(0))
        with pytest.raises(LensError, match="differs across tensor-parallel ranks"):
            LogitLens(model, tensor_parallel_size=2)
        model.head = nn.Linear(H, V - dist.get_rank())  # whole on each rank, not the same
        with pytest.raises(LensError, match=r"vocabularies of sizes \[20, 19\]"):
            LogitLens(model, tensor_parallel_size=2)
    finally:
        destroy_fairscale_model_parallel()


@distributed(world_size=2)
def test_data_parallel_equals_one_process_on_the_whole_batch():
    plain = plain_lm()
    ids = ids_for(batch=3)  # uneven: rows 0-1 on rank 0, row 2 on rank 1
    tokens, logprobs, _ = reference_lens(plain, ids, 4)
    mine = ids[:2] if dist.get_rank() == 0 else ids[2:]
    got = logit_lens(plain, mine, top_k=4, data_parallel_size=2)
    assert_same(got, tokens, logprobs)


@distributed(world_size=2)
def test_translators_that_differ_across_ranks_raise_on_every_rank():
    """Translators are checked with one exchange every rank enters, whatever it was given:
    given on one rank only, with a local error on one rank only, or permuted weights (same
    sum and sum of squares) -- the same error on every rank instead of a hang."""
    model, rank = plain_lm(), dist.get_rank()
    ids = ids_for(batch=2)
    base = nn.Linear(H, H)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)  # the same weights on every rank
        base.weight.copy_(torch.randn(H, H, generator=g) * 0.3)
        base.bias.copy_(torch.randn(H, generator=g) * 0.1)
    permuted = nn.Linear(H, H)
    with torch.no_grad():
        permuted.weight.copy_(base.weight.flip(0))
        permuted.bias.copy_(base.bias)
    cases = [
        ({1: base} if rank == 0 else {}, LensError, "translators differ across ranks"),
        ({1: base} if rank == 0 else {1: "not a module"}, TypeError, "on rank 1.*nn.Module"),
        ({1: base} if rank == 0 else {1: base, 9: base}, IndexError, "on rank 1.*got 9"),
        ({1: base} if rank == 1 else {1: base, 2: base}, ValueError,
         "on rank 0.*block 2, which the lens does not read"),
        ({1: base if rank == 0 else permuted}, LensError, "translators differ across ranks"),
    ]
    for translators, error, match in cases:
        with pytest.raises(error, match=match):
            LogitLens(model, layers=[0, 1], translators=translators, data_parallel_size=2)
        assert not any(m._forward_hooks for m in model.blocks)
    # The same translators everywhere: the lens runs, equal to one process.
    tokens, logprobs, _ = reference_lens(model, ids, 3, {1: base})
    mine = ids[:1] if rank == 0 else ids[1:]
    got = logit_lens(model, mine, layers=[0, 1], top_k=3, translators={1: base},
                     data_parallel_size=2)
    assert_same(got, tokens[[0, 1]], logprobs[[0, 1]])


def _stage(plain: LensTinyLM, stage: int, split: int) -> LensTinyLM:
    blocks = list(plain.blocks)
    if stage == 0:
        return LensTinyLM(plain.embed, blocks[:split], None, None)
    return LensTinyLM(None, blocks[split:], plain.norm, plain.head)


@distributed(world_size=2)
def test_pipeline_stages_equal_one_process():
    from flex_surgery.parallel.pipeline import StageLink

    plain = plain_lm()
    ids = ids_for(batch=4)
    tokens, logprobs, _ = reference_lens(plain, ids, 3)
    rank = dist.get_rank()
    stage = _stage(plain_lm(), rank, split=1)  # stage 0: block 0; stage 1: blocks 1-3 + head
    with LogitLens(stage, layers=[3, 0, 2], top_k=3, pipeline_parallel_size=2) as lens:
        assert list(lens.surgery.block_indices) == ([0] if rank == 0 else [1, 2, 3])
        assert lens._head_stage == 1
        with pytest.raises(LensError, match="run the pipeline step yourself"):
            lens(ids)
        link = StageLink(lens.mesh)
        with link.step(), torch.no_grad():
            for micro in ids.chunk(2):  # two micro-batches, concatenated in order
                if link.is_first:
                    link.send_forward(stage(micro))
                else:
                    stage(link.recv_forward())
        got = lens.result(link)
    assert_same(got, tokens[[3, 0, 2]], logprobs[[3, 0, 2]])


@distributed(world_size=2)
def test_pipeline_stages_must_agree_on_one_head():
    both = LensTinyLM(None, list(plain_lm().blocks)[2 * dist.get_rank():][:2], plain_lm().norm,
                      plain_lm().head)  # every stage holds a head: which one decodes?
    with pytest.raises(LensError, match=r"exactly one pipeline stage .* stages holding it: "
                                        r"\[0, 1\]"):
        LogitLens(both, pipeline_parallel_size=2)
    assert not any(b._forward_hooks for b in both.blocks)


@distributed(world_size=4)
def test_tensor_parallel_pipeline_stages_equal_one_process():
    """fairscale TP=2 inside each of 2 pipeline stages: residuals travel along both pipeline
    lines, the head stage's two ranks decode their vocabulary halves."""
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.parallel.pipeline import StageLink

    fs.initialize_model_parallel(2, pipeline_length=2)
    try:
        plain, ids = plain_lm(), ids_for(batch=2)
        tokens, logprobs, _ = reference_lens(plain, ids, 4)
        stage_id = dist.get_rank(fs.get_pipeline_parallel_group())
        stage = _stage(fairscale_lm(plain_lm(), "column"), stage_id, split=2)
        with LogitLens(stage, top_k=4, tensor_parallel_size=2,
                       pipeline_parallel_size=2) as lens:
            assert lens.mesh.sizes == {"dp": 1, "tp": 2, "pp": 2}
            link = StageLink(lens.mesh)
            with link.step(), torch.no_grad():
                if link.is_first:
                    link.send_forward(stage(ids))
                else:
                    stage(link.recv_forward())
            got = lens.result(link)
        assert_same(got, tokens, logprobs)
    finally:
        destroy_fairscale_model_parallel()


# -- the command line ---------------------------------------------------------------------------
def test_cli_lens_on_the_tiny_llama_under_tp2_equals_one_process(tmp_path, capsys):
    import json

    from flex_surgery.__main__ import main

    assert main(["lens", "--model", "tiny", "--tp", "2", "--reference", "--top-k", "3",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "lens.json").read_text())
    assert summary["tensor_parallel"] == 2 and len(summary["last_position"]) == 2
    assert summary["one_process"]["same_tokens"]
    assert summary["one_process"]["max_logprob_diff"] < 1e-4
    assert (tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG"
    assert "prediction:" in capsys.readouterr().out


def test_cli_plan_keeps_attention_whole_when_heads_do_not_split():
    from flex_surgery.lens_cli import lens_plan

    assert lens_plan(4, 2, 2) == "auto"
    plan = lens_plan(9, 3, 2)  # SmolLM2-135M over 2 ranks
    assert set(plan.values()) == {"replicate"} and "model.layers.*.self_attn.q_proj" in plan


@pytest.mark.skipif(__import__("os").environ.get("FLEX_DEMO_SMOLLM2") != "1",
                    reason="set FLEX_DEMO_SMOLLM2=1 to run the lens on the real SmolLM2 (~1 min)")
def test_smollm2_lens_says_paris_under_tp2_as_in_one_process(tmp_path):
    from flex_surgery.lens_cli import run_lens

    tp2 = run_lens("The capital of France is", model="smollm2", tp=2, reference=True,
                   out=tmp_path / "tp2", echo=lambda s: None)
    solo = run_lens("The capital of France is", model="smollm2", tp=1, out=tmp_path / "tp1",
                    echo=lambda s: None)
    assert tp2["prediction"] == solo["prediction"] == " Paris"
    assert tp2["one_process"]["same_tokens"], tp2["one_process"]
    assert len(tp2["last_position"]) == 30


def test_docs_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "lens.md"
    monkeypatch.chdir(tmp_path)  # the example writes lens.png
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        exec(compile(block, str(page), "exec"), {"__name__": "docs_example"})
    assert (tmp_path / "lens.png").is_file()


@distributed(world_size=2, timeout_s=60)
def test_an_exception_on_one_rank_leaves_the_lens_without_a_collective():
    """An exception ends rank 0's ``with LogitLens(...)`` block while rank 1 is still inside:
    rank 0 removes its hooks and queues the lens's groups at once (closing would barrier on
    groups rank 1 is not about to join there); the next agreed point frees them."""
    import datetime
    import gc
    import time

    from flex_surgery.parallel.group_lifetime import free_dropped, live_group_count

    plain, ids = plain_lm(tied=False), ids_for()
    store = dist.distributed_c10d._get_default_store()
    gc.collect()
    free_dropped(None)
    groups = live_group_count()
    start = time.monotonic()
    with pytest.raises(ValueError, match="this rank"):
        with LogitLens(plain, top_k=3, data_parallel_size=2) as lens:
            lens(ids)
            created = live_group_count() - groups
            assert created > 0
            if dist.get_rank() == 0:
                start = time.monotonic()
                raise ValueError("this rank alone")
            store.wait(["test_lens/left"], datetime.timedelta(seconds=30))
            raise ValueError("this rank too, later")
    if dist.get_rank() == 0:
        took = time.monotonic() - start
        store.set("test_lens/left", "1")
        assert took < 1.0, f"leaving the block waited {took:.1f} s on the other rank"
    assert all(not m._forward_hooks for m in plain.modules()), "hooks were left on the model"
    assert live_group_count() == groups + created  # queued, not torn down
    free_dropped(None)
    assert live_group_count() == groups
    if dist.get_rank() == 0:
        store.delete_key("test_lens/left")
