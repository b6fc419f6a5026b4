"""Run tuned-lens's model-surgery functions on a tiny GPT-2 and print what they did, as JSON.

``_test/test_tuned_lens_compat.py`` runs this once with ``tuned_lens.model_surgery`` being
tuned-lens 0.2.0's own module and once with it being flex_surgery's, and requires the same
output: the context managers (tuned-lens's own tests cover only the getters) must give the same
logits inside, leave the same model behind, and hand back the same objects.
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch
import transformers as tr
from torch import nn
from tuned_lens import model_surgery as ms


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32,
                           bos_token_id=0, eos_token_id=0)
    model = tr.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out: dict = {}

    def logits() -> str:
        with torch.no_grad():
            return _digest(model(input_ids=ids).logits)

    path, layers = ms.get_transformer_layers(model)
    out["layers"] = [len(layers), ms.get_key_path(model, path) is layers]
    out["final_norm_is_ln_f"] = ms.get_final_norm(model) is model.transformer.ln_f
    out["unembedding_is_lm_head"] = ms.get_unembedding_matrix(model) is model.lm_head
    out["base"] = logits()
    with ms.delete_layers(model, [1]) as m:
        out["delete_1"] = [m is model, len(ms.get_transformer_layers(model)[1]), logits()]
    for name, order in {"permute": [2, 0, 1], "repeat": [0, 0, 2], "drop": [2]}.items():
        with ms.permute_layers(model, order) as m:
            out[name] = [m is model, len(ms.get_transformer_layers(model)[1]), logits()]
    with ms.replace_layers(model, [0], [copy.deepcopy(layers[2])]) as m:
        out["replace_0"] = [m is model, logits()]
    with ms.assign_key_path(model, "transformer.ln_f", nn.Identity()) as m:
        out["assign_ln_f"] = [m is model, logits()]
    try:
        with ms.delete_layers(model, [0]):
            raise KeyError("inside")
    except KeyError:
        pass
    out["after_contexts"] = [ms.get_transformer_layers(model)[1] is layers, logits()]
    ms.set_key_path_(model, "transformer.h.1", copy.deepcopy(layers[0]))
    out["set_block_1"] = logits()
    ms.permute_layers_(model, [0, 2])
    out["permuted_for_good"] = [len(ms.get_transformer_layers(model)[1]), logits()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
