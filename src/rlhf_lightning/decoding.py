"""One decoding step of a Llama-family model, written out for small batches.

Decoding reads every weight once per token, so a step of a 135M model cannot beat the machine's
memory stream. transformers' layers spend more than that on the way: at batch 8 in bf16 on a 2-core
CPU with AVX-512 BF16, a step of SmolLM2-135M took ~46 ms in its 30 layers against ~11 ms to read their
weights, the rest in slow small matrix products, per-layer Python, casts, and the growing cache's
concatenations. :class:`StepDecoder`
runs the same arithmetic with
- every projection and the LM head packed once per decode into oneDNN's blocked layout
  (:func:`packed_linear`), which streams the weights at about twice the rate of a plain ``F.linear``;
- the query/key/value and gate/up projections fused into one matrix each (4 products per layer, not 7);
- a key/value cache allocated once for the whole decode and written in place, attention over it in fp32
  (transformers casts it to the autocast dtype first);
- the rotary angles from the model's own rotary module, once per step for all layers.

The prompt is still encoded by the model itself (its cache is copied in), so only the one-token steps
take this path. It applies to plain ``LlamaForCausalLM``-style models (``model_type`` ``llama``, every
projection a bias-free ``nn.Linear``); anything else (LoRA adapters, other architectures) decodes through
transformers. ``tests/test_decoding.py`` checks its logits against transformers' step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_lightning.models import backbone, lm_head

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _plain_linear(module: nn.Module | None) -> bool:
    return type(module) is nn.Linear and module.bias is None


def supports(model: nn.Module) -> bool:
    """Whether :class:`StepDecoder` reproduces ``model``'s decoding step."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    body = backbone(model)
    if not all(hasattr(body, name) for name in ("layers", "norm", "rotary_emb", "embed_tokens")):
        return False
    if not all(hasattr(layer.self_attn, name) for layer in body.layers for name in ("head_dim", "scaling")):
        return False  # an older transformers' attention module
    return all(_plain_linear(layer.get_submodule(p)) for layer in body.layers for p in _PROJECTIONS)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (Su et al. 2021) as Llama applies it: the two halves of each head
    rotated by the position's angles."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class StepDecoder:
    """Decodes one token per call for a batch whose prompt is already encoded.

    Args:
        model: A causal LM for which :func:`supports` holds.
        cache: The model's key/value cache after encoding the (left-padded) prompts.
        prompt_mask: ``(batch, prompt_length)`` attention mask of the prompts.
        max_new_tokens: Steps this decoder will take at most (the cache's size).
        rows: The cache's row of each prompt (:func:`distinct_rows`); ``None``: one row per prompt.
    """

    def __init__(
        self, model: nn.Module, cache, prompt_mask: Tensor, max_new_tokens: int, rows: Tensor | None = None
    ):
        body = backbone(model)
        self.body = body
        device = prompt_mask.device
        self.dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else body.layers[0].self_attn.q_proj.weight.dtype
        )
        attention = body.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        batch, prompt_length = prompt_mask.shape
        linear = partial(packed_linear, batch=batch, dtype=self.dtype)
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                linear(a.o_proj.weight),
                layer.post_attention_layernorm,
                linear(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                linear(m.down_proj.weight),
                m.act_fn,
            ))  # fmt: skip
        head = lm_head(model)
        self.head = linear(head.weight) if _plain_linear(head) else None
        size = prompt_length + max_new_tokens
        # attention runs in fp32 over an fp32 cache (transformers casts to the autocast dtype first)
        self.keys, self.values = [], []
        for i in range(len(body.layers)):
            k, v = _cached(cache, i)
            if rows is not None:
                k, v = k[rows], v[rows]
            shape = (batch, self.kv_heads, size, self.head_dim)
            keys, values = k.new_empty(shape, dtype=torch.float32), v.new_empty(shape, dtype=torch.float32)
            keys[:, :, :prompt_length] = k
            values[:, :, :prompt_length] = v
            self.keys.append(keys)
            self.values.append(values)
        self.bias = torch.zeros(batch, 1, 1, size, device=device)  # -inf at the prompts' padding
        self.bias[:, 0, 0, :prompt_length].masked_fill_(prompt_mask == 0, float("-inf"))
        self.length = prompt_length

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The final hidden state ``(batch, hidden)`` after feeding ``tokens`` ``(batch,)`` at
        ``positions`` ``(batch, 1)``."""
        t = self.length
        self.length += 1
        batch = tokens.shape[0]
        hidden = self.body.embed_tokens(tokens)
        cos, sin = self.body.rotary_emb(hidden, positions)  # (batch, 1, head_dim), hidden's dtype
        heads, q_size = self.heads + self.kv_heads, self.heads * self.head_dim
        bias = self.bias[..., : t + 1]
        for (norm1, qkv, out, norm2, gate_up, down, act), keys, values in zip(
            self.layers, self.keys, self.values, strict=True
        ):
            projected = qkv(norm1(hidden).to(self.dtype))
            qk = rotate(projected[:, : heads * self.head_dim].view(batch, heads, self.head_dim), cos, sin)
            keys[:, :, t] = qk[:, self.heads :]
            values[:, :, t] = projected[:, heads * self.head_dim :].view(batch, self.kv_heads, self.head_dim)
            groups = qk[:, : self.heads].view(batch, self.kv_heads, -1, self.head_dim)  # heads sharing a key
            scores = torch.matmul(groups, keys[:, :, : t + 1].transpose(-1, -2)) * self.scaling + bias
            attended = torch.matmul(torch.softmax(scores, dim=-1), values[:, :, : t + 1])
            hidden = hidden + out(attended.reshape(batch, q_size).to(self.dtype))
            gate, up = gate_up(norm2(hidden).to(self.dtype)).chunk(2, dim=-1)
            hidden = hidden + down(act(gate) * up)
        return self.body.norm(hidden)

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor | None:
        """The LM head on final hidden states ``(batch, hidden)`` in the compute dtype, or ``None``
        where the head is not a plain bias-free linear layer."""
        return None if self.head is None else self.head(hidden.to(self.dtype))


def packed_linear(weight: Tensor, batch: int, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``x -> x @ weight.T`` for inputs of ``batch`` rows in ``dtype``, on the CPU with the weight packed
    once into oneDNN's blocked layout. A plain ``F.linear`` with few rows streams its weight at about
    half the machine's memory bandwidth (it is re-laid out on every call); packed, a 2-core EPYC read
    the 30 layers' weights at 20 GB/s in bf16 and 24 GB/s in fp32, against 12 and 9 unpacked (batch 8).
    Elsewhere, or where oneDNN refuses the weight, a plain ``F.linear`` on the weight cast once."""
    weight = weight.detach().to(dtype)
    if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (AttributeError, RuntimeError):  # an older torch, or a dtype this CPU's oneDNN lacks
            pass
    return lambda x: F.linear(x, weight)


def distinct_rows(input_ids: Tensor, attention_mask: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
    """The distinct (prompt, mask) rows of a batch and the index of each original row among them, or the
    batch itself and ``None`` when no row repeats. A rollout samples each prompt K times: its prompts
    need encoding once, and a row's encoding does not depend on the other rows of its batch."""
    both = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    distinct, rows = torch.unique(both, dim=0, return_inverse=True)
    if len(distinct) == len(both):
        return (input_ids, attention_mask), None
    width = input_ids.shape[1]
    return (distinct[:, :width], distinct[:, width:].to(attention_mask.dtype)), rows


def _cached(cache, layer: int) -> tuple[Tensor, Tensor]:
    """Keys and values of one layer of a transformers cache (5.x ``layers``, 4.x ``key_cache``)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]
