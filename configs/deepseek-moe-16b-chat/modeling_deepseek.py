"""A DeepSeek-MoE-shaped causal LM (llm-gateway's own imitation, not DeepSeek's code).

Same module tree and parameter shapes as DeepSeek-MoE: layer 0 has a dense MLP, every
later layer a mixture of experts with always-on shared experts plus `n_routed_experts`
routed ones, picked per token by a softmax top-k gate. Used two ways:
- `llm-gateway plan` builds it from the real config on the meta device (no weights) and
  lets accelerate place its decoder layers over GPUs;
- tests build tiny random ones that load through `auto_map` + `trust_remote_code`.

It runs on transformers 4.47 and 5.x. It keeps no KV cache (each step recomputes the whole
sequence): simple and version-proof, and fast enough for the tiny models it generates with.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .configuration_deepseek import DeepseekConfig


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden):
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class DeepseekRotaryEmbedding(nn.Module):
    # Frequencies are computed per call, not kept in a buffer: transformers 5 builds models
    # on the meta device and leaves a non-persistent buffer made in __init__ uninitialised.
    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, position_ids, dtype):
        steps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (steps / self.dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class DeepseekAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        bias = config.attention_bias
        width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.rotary_emb = DeepseekRotaryEmbedding(self.head_dim, base=config.rope_theta)

    def forward(self, hidden, mask, position_ids):
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, -1).transpose(1, 2)
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DeepseekMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax scores over the routed experts; each token goes to its top-k."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden):
        scores = torch.softmax(F.linear(hidden.float(), self.weight.float()), dim=-1)
        weights, experts = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights


class DeepseekMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        size = config.moe_intermediate_size
        self.experts = nn.ModuleList(
            DeepseekMLP(config, size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = DeepseekMLP(config, size * config.n_shared_experts)

    def forward(self, hidden):
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        experts, weights = self.gate(flat)
        routed = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            tokens, slot = (experts == index).nonzero(as_tuple=True)
            if tokens.numel():
                gain = weights[tokens, slot, None].to(flat.dtype)
                routed.index_add_(0, tokens, expert(flat[tokens]) * gain)
        return routed.view(shape) + self.shared_experts(hidden)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = DeepseekAttention(config)
        moe = (
            config.n_routed_experts
            and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0
        )
        self.mlp = DeepseekMoE(config) if moe else DeepseekMLP(config, config.intermediate_size)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, mask, position_ids):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, position_ids)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeepseekDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, MoEGate):
            module.weight.data.normal_(mean=0.0, std=std)


class DeepseekModel(DeepseekPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed_tokens(input_ids)
        # Left padding: positions count real tokens only, pads are masked out as keys.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = _causal_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask, position_ids)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))


def _causal_mask(attention_mask, dtype):
    length = attention_mask.shape[-1]
    device = attention_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    # A fully masked row (a pad query) attends to itself so softmax stays finite.
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)[None, None]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step sees the whole sequence (see the module docstring).
        return {"input_ids": input_ids, "attention_mask": attention_mask}
