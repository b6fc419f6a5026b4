"""Temporary layer surgery: delete / permute / replace blocks on a copy of the container, and
the original container object (and everything in it) is back afterwards, even on error."""

from __future__ import annotations

import pytest
import torch

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import (
    LayerSurgery,
    PassThrough,
    SurgeryError,
    SurgicalTheater,
    delete_blocks,
    permute_blocks,
    replace_blocks,
)


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama", num_hidden_layers=3)


def _run_blocks(model, x, order):
    """Reference: run the decoder by hand with the blocks in ``order``."""
    m = model.model
    h = m.embed_tokens(x)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    emb = m.rotary_emb(h, pos)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=m.config, inputs_embeds=h, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    for i in order:
        h = m.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize("make,order", [
    (lambda m: delete_blocks(m, [1]), [0, 2]),
    (lambda m: permute_blocks(m, [2, 0, 1]), [2, 0, 1]),
    (lambda m: permute_blocks(m, [0, 0, 1]), [0, 0, 1]),
    (lambda m: replace_blocks(m, {1: PassThrough()}), [0, 2]),
])
def test_surgery_runs_the_chosen_blocks_and_restores_the_container(llama, make, order):
    x = example_inputs("llama")["input_ids"]
    container, blocks = llama.model.layers, list(llama.model.layers)
    base = llama(input_ids=x).logits
    with torch.no_grad(), make(llama) as new:
        assert new is llama.model.layers and new is not container
        got = llama(input_ids=x).logits
    with torch.no_grad():  # the reference indexes the original container
        want = _run_blocks(llama, x, order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base)
    assert llama.model.layers is container and list(container) == blocks
    assert torch.equal(llama(input_ids=x).logits, base)


def test_original_is_reinstalled_on_error_and_misuse_is_detected(llama):
    container = llama.model.layers
    with pytest.raises(RuntimeError, match="boom"):
        with delete_blocks(llama, [0, 2]):
            assert len(llama.model.layers) == 1
            raise RuntimeError("boom")
    assert llama.model.layers is container and len(container) == 3
    outer, inner = delete_blocks(llama, [0]), permute_blocks(llama, [1, 0])
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(SurgeryError, match="out of order"):
        outer.__exit__(None, None, None)
    llama.model.layers = container  # outer put the original back; inner is now stale
    with pytest.raises(IndexError, match="3 blocks"):
        delete_blocks(llama, [3])
    with pytest.raises(IndexError):
        LayerSurgery(llama, order=[0, 7]).__enter__()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        permute_blocks(llama, [0, 0, 1, 2]).__enter__()
    assert llama.model.layers is container


def test_nests_with_surgical_theater(llama):
    x = example_inputs("llama")["input_ids"]
    base = llama(input_ids=x).logits
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    with delete_blocks(llama, [2]), SurgicalTheater(llama, layers=[0], modification_type="scale",
                                                    factor=0.0):
        assert len(llama.model.layers) == 2
        llama(input_ids=x)
    for n, p in llama.named_parameters():
        assert torch.equal(p, before[n])
    assert torch.equal(llama(input_ids=x).logits, base)


def test_layer_surgeries_exited_out_of_order_leave_the_original_blocks():
    """Exiting an outer surgery before the inner one: both raise, and the model's own container
    is back. The inner one used to reinstall *its* original, the outer surgery's permuted
    list, so the model kept running with blocks [1, 0] after both said otherwise."""
    from flex_surgery.models import example_inputs, tiny_hf_model
    from flex_surgery.surgery.layers import LayerSurgery
    from flex_surgery.surgery.theater import SurgeryError

    model = tiny_hf_model("llama")
    container, blocks = model.model.layers, list(model.model.layers)
    ids = example_inputs("llama")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    outer = LayerSurgery(model, order=[1, 0])
    inner = LayerSurgery(model, order=[0])
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(SurgeryError, match="original was reinstalled"):
        outer.__exit__(None, None, None)
    with pytest.raises(SurgeryError, match="original was reinstalled"):
        inner.__exit__(None, None, None)
    assert model.model.layers is container and list(model.model.layers) == blocks, (
        f"left installed: {[blocks.index(b) for b in model.model.layers]}")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
