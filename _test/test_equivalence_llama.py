"""A tiny Llama built from fairscale TP layers, with the weights of a tiny HF
``LlamaForCausalLM``, wrapped in FlexModel on 2 ranks, equals the HF model in one process:
logits, what every hook kind stores (column, row, parameter-free and norm modules, attention
heads split over ranks), parameter gradients, with and without an x2 editing function."""

import math

import torch
import torch.distributed as dist
from parallel_cases import (
    EDIT_MODES,
    assert_grads_equal,
    assert_stored_equal,
    local_group,
    run_flex,
)
from rank_pool import distributed
from torch import nn

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.parallel.collectives import all_gather
from flex_surgery.parallel.layout import fairscale_param_dim

TOL = dict(rtol=1e-6, atol=1e-9)  # float64 weights; HF runs the softmax in float32

SITES = [
    ("model.embed_tokens", "forward"),
    ("model.layers.0.self_attn.q_proj", "forward"),
    ("model.layers.0.self_attn.o_proj", "forward_pre"),
    ("model.layers.0.mlp.up_proj", "forward"),
    ("model.layers.0.mlp.act_fn", "forward"),
    ("model.layers.0.mlp.down_proj", "forward"),
    ("model.layers.1.mlp.down_proj", "full_backward"),
    ("model.layers.1.mlp.gate_proj", "full_backward_pre"),
    ("model.layers.1.self_attn.o_proj", "full_backward"),
    ("model.norm", "forward"),
]
PARAM_SITES = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight",
               "model.layers.1.post_attention_layernorm.weight"]


class Attention(nn.Module):
    def __init__(self, config, tp: int) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        h, n_heads, n_kv = (config.hidden_size, config.num_attention_heads,
                            config.num_key_value_heads)
        self.head_dim = h // n_heads
        self.local_heads, self.local_kv = n_heads // tp, n_kv // tp

        def col(n_out):
            return ColumnParallelLinear(h, n_out, bias=False, gather_output=False)

        self.q_proj = col(n_heads * self.head_dim)
        self.k_proj = col(n_kv * self.head_dim)
        self.v_proj = col(n_kv * self.head_dim)
        self.o_proj = RowParallelLinear(n_heads * self.head_dim, h, bias=False,
                                        input_is_parallel=True)

    def forward(self, x, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        b, t, _ = x.shape

        def heads(y, n):
            return y.view(b, t, n, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x), self.local_heads)
        k = heads(self.k_proj(x), self.local_kv)
        v = heads(self.v_proj(x), self.local_kv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = self.local_heads // self.local_kv
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        mask = torch.full((t, t), torch.finfo(scores.dtype).min, dtype=scores.dtype).triu(1)
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, f, bias=False, gather_output=False)
        self.up_proj = ColumnParallelLinear(h, f, bias=False, gather_output=False)
        self.down_proj = RowParallelLinear(f, h, bias=False, input_is_parallel=True)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, tp: int) -> None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config, tp: int) -> None:
        from fairscale.nn.model_parallel.layers import VocabParallelEmbedding
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        cos, sin = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class FairscaleLlama(nn.Module):
    """``LlamaForCausalLM``'s module names and maths, with fairscale TP layers."""

    def __init__(self, config, tp: int) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear

        super().__init__()
        self.model = Body(config, tp)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                            gather_output=True)

    def forward(self, ids):
        return self.lm_head(self.model(ids))

    def load_hf(self, hf: nn.Module) -> "FairscaleLlama":
        """Copy this rank's shard of every HF weight."""
        from fairscale.nn.model_parallel import initialize as fs

        tp, r = fs.get_model_parallel_world_size(), fs.get_model_parallel_rank()
        full = dict(hf.named_parameters())
        modules = dict(self.named_modules())
        with torch.no_grad():
            for name, p in self.named_parameters():
                owner = modules[name.rpartition(".")[0]]
                dim = fairscale_param_dim(owner, p)
                w = full[name]
                if dim is not None:
                    w = w.chunk(tp, dim)[r]
                p.copy_(w)
        return self


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@distributed(world_size=2)
def test_fairscale_llama_with_hf_weights_equals_hf_in_one_process():
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    ids = example_inputs("llama", batch=2, seq=6)["input_ids"]
    loss_fn = lambda out: _logits(out).pow(2).mean()  # noqa: E731
    for edit in EDIT_MODES:
        hf = tiny_hf_model("llama", dtype=torch.float64)
        ref_stored, ref_out, _ = run_flex(hf, ids, edit, sites=SITES, param_sites=PARAM_SITES,
                                          loss_fn=loss_fn, process_group=local_group())
        torch.set_default_dtype(torch.float64)  # fairscale allocates in the default dtype
        model = FairscaleLlama(hf.config, tp=2).load_hf(hf)
        torch.set_default_dtype(torch.float32)
        stored, out, _ = run_flex(model, ids, edit, sites=SITES, param_sites=PARAM_SITES,
                                  loss_fn=loss_fn, tensor_parallel_size=2)
        torch.testing.assert_close(out, ref_out.logits, **TOL)
        if dist.get_rank() == 0:
            assert_stored_equal(stored, ref_stored, **TOL)
        grads = {}
        modules = dict(model.named_modules())
        for name, p in model.named_parameters():
            dim = fairscale_param_dim(modules[name.rpartition(".")[0]], p)
            grads[name] = p.grad if dim is None else all_gather(p.grad, dim,
                                                                fs.get_model_parallel_group())
        assert_grads_equal(grads, {n: p.grad for n, p in hf.named_parameters()}, **TOL)
