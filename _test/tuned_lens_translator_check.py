"""A trained tuned-lens ``TunedLens`` plugged into flex_surgery's lens gives tuned-lens's answer.

``_test/test_tuned_lens_compat.py`` runs this with tuned-lens 0.2.0's package (from its source
archive) importable. On a tiny GPT-2, a ``tuned_lens.TunedLens`` with random (non-identity)
translators decodes each block's output as tuned-lens does (``lens(hidden_states[i], i)``:
its index counts the embedding output as 0); :class:`flex_surgery.lens.LogitLens` with
``translators={b: tuned[b + 1]}`` must give the same top-k tokens and log-probabilities for
every block that has a translator. Exits non-zero with the difference otherwise.
"""

from __future__ import annotations

import torch
import transformers as tr
from tuned_lens import TunedLens

from flex_surgery.lens import LogitLens


def main() -> None:
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32,
                           bos_token_id=0, eos_token_id=0)
    model = tr.GPT2LMHeadModel(config).eval()
    tuned = TunedLens.from_model(model)
    with torch.no_grad():  # a trained lens is not the identity: random translators
        for p in tuned.layer_translators.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    n, k = config.n_layer, 5
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        theirs = [tuned(hidden[b + 1], b + 1).log_softmax(-1).topk(k) for b in range(n - 1)]
    with LogitLens(model, layers=list(range(n - 1)), top_k=k,
                   translators={b: tuned[b + 1] for b in range(n - 1)}) as lens:
        ours = lens(input_ids=ids)
    for b in range(n - 1):
        assert torch.equal(ours.tokens[b], theirs[b].indices), f"block {b}: tokens differ"
        torch.testing.assert_close(ours.logprobs[b], theirs[b].values, rtol=1e-5, atol=1e-6)
    identity = TunedLens.from_model(model)  # untrained (zero translators): the logit lens
    with LogitLens(model, layers=[0], top_k=k, translators={0: identity[1]}) as lens:
        same = lens(input_ids=ids)
    with LogitLens(model, layers=[0], top_k=k, translators={0: tuned[1]}) as lens:
        other = lens(input_ids=ids)
    assert not torch.equal(same.logprobs, other.logprobs), "the translators changed nothing"
    print(f"tuned-lens translators: {n - 1} blocks equal")


if __name__ == "__main__":
    main()
