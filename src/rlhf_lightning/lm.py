"""Forward passes of language models that compute only what the losses read.

The LM head of a 135M model with a 49k vocabulary costs as much as several transformer layers, and
most positions of an SFT or PPO batch (prompt and pad) never reach a loss. These helpers run the
backbone once and project only the selected positions. Positions are derived from the attention
mask, so left-padded prompts (generation) and right-padded ones (training) agree, or given by a
share-prompt preference batch, whose responses restart where their prompt ends.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_lightning import decoding
from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.models import backbone, decoder_layers, lm_head, score_head


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The backbone's last hidden states, ``(batch, time, hidden)``."""
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def hidden_states_and_trunk(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, blocks: int
) -> tuple[Tensor, Tensor]:
    """:func:`hidden_states`, and the hidden states the lowest ``blocks`` transformer blocks hand to the
    next one (the "trunk"), read in the same forward pass."""
    captured = []

    def keep(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[blocks - 1].register_forward_hook(keep)
    try:
        hidden = hidden_states(model, input_ids, attention_mask)
    finally:
        handle.remove()
    return hidden, captured[0]


@contextmanager
def _only_blocks_from(model: nn.Module, first: int):
    """The backbone runs its transformer blocks from ``first`` on only; its input embeddings are then the
    hidden states entering block ``first``."""
    body, layers = backbone(model), decoder_layers(model)
    name = next((n for n, child in body.named_children() if child is layers), None)
    if name is None:
        raise ConfigurationError(
            f"{type(body).__name__} keeps its blocks below the top level: cannot run part of them"
        )
    setattr(body, name, nn.ModuleList(list(layers)[first:]))
    try:
        yield body
    finally:
        setattr(body, name, layers)


def hidden_states_from_trunk(model: nn.Module, trunk: Tensor, attention_mask: Tensor, blocks: int) -> Tensor:
    """:func:`hidden_states` computed from the trunk of :func:`hidden_states_and_trunk`: only the blocks
    above the lowest ``blocks`` run. A frozen trunk shared by two models (a policy whose lower blocks do
    not train, and its reference) is then computed once for both."""
    with _only_blocks_from(model, blocks) as body:
        out = body(
            inputs_embeds=trunk,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
    return out.last_hidden_state


def trunk_is_reusable(model: nn.Module, blocks: int) -> bool:
    """Whether :func:`hidden_states_from_trunk` gives ``model``'s hidden states (checked on a few tokens):
    architectures that rescale their input embeddings inside the backbone (Gemma) do not."""
    ids = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7]], device=next(model.parameters()).device)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], device=ids.device)
    try:
        with torch.no_grad():
            hidden, trunk = hidden_states_and_trunk(model, ids, mask, blocks)
            again = hidden_states_from_trunk(model, trunk, mask, blocks)
    except (ConfigurationError, TypeError, ValueError):
        return False
    real = mask.bool()
    return bool(torch.allclose(hidden[real], again[real], rtol=1e-4, atol=1e-5))


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A reward model's scalar score of each row, read at its last real token, ``(batch,)``."""
    hidden = hidden_states(model, input_ids, attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return score_head(model)(last).squeeze(-1)


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # the attention kernels that take the block mask below


def shared_prompt_mask(segments: Tensor, implementation: str = "sdpa") -> Tensor:
    """The block attention mask of a share-prompt batch (``rlhf_lightning.data.preference``),
    ``(rows, 1, time, time)``: a token sees the earlier tokens of the prompt (segment 0) and of its own
    segment. A pad sees itself as well, so no softmax row is empty. Boolean for ``sdpa`` attention,
    additive (0 or the float32 minimum) for ``eager``, the forms transformers takes as a custom mask.
    """
    if implementation not in SHARED_PROMPT_ATTENTION:
        raise ConfigurationError(
            f"data.share_prompt needs a model with sdpa or eager attention, not {implementation!r}: "
            "set data.init_args.share_prompt: false"
        )
    time = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(time, time, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(time, dtype=torch.bool, device=segments.device)
    if implementation == "sdpa":
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def attention_implementation(model: nn.Module) -> str:
    """The attention kernel transformers runs ``model`` with (``sdpa``, ``eager``, ...)."""
    return getattr(backbone(model).config, "_attn_implementation", None) or "eager"


def shared_prompt_hidden(model: nn.Module, batch: dict) -> Tensor:
    """The backbone's last hidden states of a share-prompt batch, ``(rows, time, hidden)``."""
    body = backbone(model)
    mask = shared_prompt_mask(batch["segments"], attention_implementation(model))
    out = body(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    )
    return out.last_hidden_state


def ranking_scores(model: nn.Module, batch: dict) -> Tensor:
    """A reward model's score of each response of a preference batch, ``(responses,)``, in either layout
    of ``rlhf_lightning.data.preference``: read at each response's last token (an empty response: at
    its prompt's last token, as one row per response reads it)."""
    if "segments" not in batch:
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    hidden = shared_prompt_hidden(model, batch)
    lengths = batch["response_lengths"].long()
    last = torch.where(lengths > 0, batch["response_starts"] + lengths - 1, batch["prompt_lengths"] - 1)
    return score_head(model)(hidden[batch["response_rows"], last]).squeeze(-1)


def head_logits(model: nn.Module, hidden: Tensor, fp32: bool = False) -> Tensor:
    """The LM head on ``hidden``; with ``fp32`` outside autocast, in float32.

    A bf16 logit of ~20 has a rounding step of 0.125, about the PPO clip range in log-ratio at
    temperature 0.7: probability ratios need the head in fp32 (the backbone may stay in bf16).

    The head reads ``hidden`` as a 2-D matrix. Given a strided 3-D slice (the last position, or the
    response positions) and a weight that needs no gradient (a frozen or bf16 model, or any model under
    ``no_grad`` after an autocast cast), torch multiplies by a batched matmul over one expanded copy of
    the weight per row: for a 49k-vocabulary head, 56 MB per row in bf16. transformers' ``generate``
    does exactly that at its first step, which took 3.6 s and 1.8 GB at batch 32 on a 2-core CPU,
    against 10 ms for the same product on the rows as a matrix.
    """
    head = lm_head(model)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not fp32:
        logits = head(flat)
    else:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = head.bias.float() if getattr(head, "bias", None) is not None else None
            logits = F.linear(flat.float(), head.weight.float(), bias)
    return logits.view(*hidden.shape[:-1], logits.shape[-1])


def response_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, start: int, fp32_head: bool = False
) -> Tensor:
    """Logits predicting tokens ``start:`` of each row, ``(batch, time - start, vocab)``."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, start - 1 : -1]
    return head_logits(model, hidden, fp32_head)


def _sampling_logits(logits: Tensor, temperature: float, suppress: int | None) -> Tensor:
    """fp32 ``logits / temperature`` with the ``suppress`` token at -inf (no copy that is not needed)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if suppress is not None:
        logits = logits.index_fill(-1, torch.tensor([suppress], device=logits.device), float("-inf"))
    return logits


def sampling_log_softmax(logits: Tensor, temperature: float = 1.0, suppress: int | None = None) -> Tensor:
    """Log of the distribution :func:`sample` draws from: ``softmax(logits / temperature)``, with the
    ``suppress`` token (the pad token, never sampled) given probability 0."""
    return F.log_softmax(_sampling_logits(logits, temperature, suppress), dim=-1)


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, suppress: int | None = None
) -> Tensor:
    """Log-probability of ``tokens`` under the sampling distribution (see :func:`sampling_log_softmax`).

    Computed as ``logit[token] - logsumexp(logits)``, which never materialises the full log-softmax
    (a vocabulary-sized tensor per position). The suppressed (pad) token only fills masked positions
    after EOS; it gets 0, not -inf, so masks can multiply the result.
    """
    logits = _sampling_logits(logits, temperature, suppress)
    out = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return out if suppress is None else out.masked_fill(tokens == suppress, 0.0)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, suppress: int | None = None) -> Tensor:
    """Entropy of the sampling distribution at each position."""
    logp = sampling_log_softmax(logits, temperature, suppress)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


class _FusedHeadLogprobs(torch.autograd.Function):
    """``logit[token] - logsumexp(logits)`` of a linear LM head, in float32, over row groups, with a
    backward that recomputes each group's logits instead of keeping them.

    The plain autograd graph keeps the fp32 logits of every position for the backward of ``logsumexp``
    and then builds their gradient and a softmax of the same size: for a DPO batch of 16 sequences of
    100 tokens over a 49k vocabulary that is three tensors of 0.3 GB. Here only the hidden states and
    one log-normaliser per position are kept; the backward forms ``(onehot - softmax) * grad`` one group
    at a time, at the cost of one more head matmul. The gradients are those of the plain graph (test:
    ``tests/test_speedups.py``).
    """

    @staticmethod
    def _logits(
        hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, suppress: int | None
    ):
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.linear(hidden.float(), weight, bias)
        if temperature != 1.0:
            logits.div_(temperature)
        if suppress is not None:
            logits[:, suppress] = float("-inf")
        return logits

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, suppress, rows):
        w, b = weight.float(), None if bias is None else bias.float()
        out = torch.empty(hidden.shape[0], device=hidden.device)
        lse = torch.empty_like(out)
        for begin in range(0, hidden.shape[0], rows):
            end = begin + rows
            logits = _FusedHeadLogprobs._logits(hidden[begin:end], w, b, temperature, suppress)
            lse[begin:end] = torch.logsumexp(logits, dim=-1)
            out[begin:end] = logits.gather(-1, tokens[begin:end, None]).squeeze(-1) - lse[begin:end]
            del logits
        if suppress is not None:
            out.masked_fill_(tokens == suppress, 0.0)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.suppress, ctx.rows = temperature, suppress, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        t, suppress, rows = ctx.temperature, ctx.suppress, ctx.rows
        g = grad_out.float() if suppress is None else grad_out.float().masked_fill(tokens == suppress, 0.0)
        w, b = weight.float(), None if bias is None else bias.float()
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(w) if need_weight else None
        grad_bias = torch.zeros_like(b) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):  # a backward called under autocast stays fp32
            _FusedHeadLogprobs._backward_groups(
                hidden, w, b, tokens, lse, g, t, suppress, rows, grad_hidden, grad_weight, grad_bias
            )
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None

    @staticmethod
    def _backward_groups(
        hidden, w, b, tokens, lse, g, t, suppress, rows, grad_hidden, grad_weight, grad_bias
    ):
        """Accumulate the three gradients one row group at a time (the logits are recomputed)."""
        for begin in range(0, hidden.shape[0], rows):
            end = begin + rows
            h = hidden[begin:end].float()
            d = _FusedHeadLogprobs._logits(h, w, b, t, suppress)  # recomputed, as the forward made them
            d.sub_(lse[begin:end, None]).exp_().mul_(-g[begin:end, None])  # -softmax * grad
            d.scatter_add_(-1, tokens[begin:end, None], g[begin:end, None])  # + onehot * grad
            if t != 1.0:
                d.div_(t)
            if grad_hidden is not None:
                grad_hidden[begin:end] = (d @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(d.T, h)
            if grad_bias is not None:
                grad_bias += d.sum(0)
            del d, h


def head_logprobs(
    model: nn.Module,
    hidden: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    suppress: int | None = None,
    fp32_head: bool = False,
    max_logits: int = 2**23,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``tokens`` from the hidden states that predict them, ``(batch, time)``; with
    ``with_entropy`` also the sampling distribution's entropy at each position.

    Without gradients the LM head and the softmax run over groups of rows holding at most ``max_logits``
    vocabulary entries (32 MiB in fp32 by default; the softmax and entropy make a few temporaries of that
    size), so memory stays flat however large the batch: a PPO
    rollout of 32 responses of 48 tokens over a 49k vocabulary would otherwise materialise 0.3 GB of
    logits and several temporaries of that size (1 GB, the PPO stage's memory peak). With gradients, an
    fp32 head that is a plain linear layer, and no entropy, the same row groups are used by
    :class:`_FusedHeadLogprobs`, whose backward recomputes each group's logits instead of keeping them.
    """
    head = lm_head(model)
    vocab = head.out_features
    if torch.is_grad_enabled() and fp32_head and not with_entropy and type(head) is nn.Linear:
        flat_tokens = tokens.reshape(-1)
        rows = max(1, max_logits // vocab)
        flat = _FusedHeadLogprobs.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            head.bias,
            flat_tokens,
            temperature,
            suppress,
            rows,
        )
        return flat.view(tokens.shape)
    per_row = max(1, tokens.shape[1] * vocab)
    rows = max(1, max_logits // per_row) if not torch.is_grad_enabled() else tokens.shape[0]
    logprobs, entropies = [], []
    for h, t in zip(hidden.split(rows), tokens.split(rows)):
        logits = head_logits(model, h, fp32_head)
        logprobs.append(logprobs_from_logits(logits, t, temperature, suppress))
        if with_entropy:
            entropies.append(entropy_from_logits(logits, temperature, suppress))
        del logits
    if with_entropy:
        return torch.cat(logprobs), torch.cat(entropies)
    return torch.cat(logprobs)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    start: int,
    temperature: float = 1.0,
    suppress: int | None = None,
    fp32_head: bool = False,
    max_logits: int = 2**23,
) -> Tensor:
    """Log-probabilities of the tokens from ``start`` on, ``(batch, time - start)``: the backbone once,
    then :func:`head_logprobs` (in row groups without gradients)."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, start - 1 : -1]
    return head_logprobs(model, hidden, input_ids[:, start:], temperature, suppress, fp32_head, max_logits)


def completion_logprob(model: nn.Module, batch: dict, fp32_head: bool = False) -> Tensor:
    """``log pi(y|x)`` of each response of a preference batch: the sum of its tokens' log-probabilities
    (temperature 1), ``(responses,)``.

    ``batch`` is laid out as the preference data collates it: right-padded ``input_ids`` and
    ``attention_mask`` with each row's ``prompt_lengths`` (the LM head runs from the shortest prompt on),
    or the share-prompt layout (the head runs on each response's positions). Without gradients the head
    runs in row groups; ``fp32_head`` runs it in float32.
    """
    if "segments" in batch:
        return _shared_prompt_logprob(model, batch, fp32_head)
    ids, mask, prompt_lengths = batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"]
    start = max(1, int(prompt_lengths.min()))
    logprobs = response_logprobs(model, ids, mask, start, fp32_head=fp32_head)
    positions = torch.arange(start, ids.shape[1], device=ids.device)
    in_response = (positions[None, :] >= prompt_lengths[:, None]) & mask[:, start:].bool()
    return (logprobs * in_response).sum(-1)


def _shared_prompt_logprob(model: nn.Module, batch: dict, fp32_head: bool) -> Tensor:
    """:func:`completion_logprob` of a share-prompt batch: each response's first token is predicted by
    its prompt's last position, every other token by the position before it in the same segment."""
    hidden = shared_prompt_hidden(model, batch)
    rows, starts = batch["response_rows"], batch["response_starts"]
    lengths = batch["response_lengths"].long()
    steps = torch.arange(max(1, int(lengths.max())), device=rows.device)
    real = steps[None, :] < lengths[:, None]
    positions = (starts[:, None] + steps[None, :]).clamp(max=hidden.shape[1] - 1)
    predictors = torch.where(steps[None, :] == 0, batch["prompt_lengths"][:, None] - 1, positions - 1)
    tokens = batch["input_ids"][rows[:, None], positions]
    logprobs = head_logprobs(model, hidden[rows[:, None], predictors], tokens, fp32_head=fp32_head)
    return (logprobs * real).sum(-1)


def suppressed_token(pad_token_id: int, eos_token_id: int) -> int | None:
    """The token :func:`sample` never emits: the pad token, unless it doubles as EOS."""
    return pad_token_id if pad_token_id != eos_token_id else None


def mask_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Replace everything after the first EOS by pad; returns ``(responses, mask)``, EOS kept in the mask."""
    is_eos = responses == eos_token_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after
    return responses.masked_fill(after, pad_token_id), mask


def draw_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress: int | None = None,
    do_sample: bool = True,
) -> Tensor:
    """One token per row of ``logits`` ``(batch, vocab)``: drawn from ``softmax(logits / temperature)``
    (the :func:`sampling_log_softmax` distribution), optionally cut to the ``top_k`` most probable
    tokens and then to the smallest set whose probability reaches ``top_p``; the argmax without
    ``do_sample``. The ``suppress`` token is never drawn.

    The draw inverts the cumulative distribution with one uniform number per row, where
    ``torch.multinomial`` (what transformers' ``generate`` calls) draws an exponential variate for every
    vocabulary entry: 12 ms per step for 8 rows of a 49k vocabulary on a 2-core CPU, a fifth of a
    135M model's whole decoding step.
    """
    logits = _sampling_logits(logits, temperature if do_sample else 1.0, suppress)
    if not do_sample:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)
        before = ranked.cumsum(-1) - ranked  # probability of the more probable tokens
        probs = probs.scatter(-1, order, ranked.masked_fill(before >= top_p, 0.0))
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _decoding_head(model: nn.Module, device_type: str):
    """The LM head as decoding calls it once per step. Under autocast a plain linear head is cast to
    the autocast dtype once here, which autocast would otherwise do at every step: a tied head stays
    in fp32 beside the embedding (``models.linear_weights_to``), and casting its 49k x 576 weight
    reads 113 MB and writes 57 MB per token, more than the rest of a bf16 135M model reads. The logits
    are the ones autocast gives."""
    head = lm_head(model)
    if type(head) is not nn.Linear or not torch.is_autocast_enabled(device_type):
        return lambda hidden: head_logits(model, hidden)
    dtype = torch.get_autocast_dtype(device_type)
    weight = head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return lambda hidden: F.linear(hidden.to(dtype), weight, bias)


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    step_decoder: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generate from left-padded prompts with the KV cache: the backbone once over the prompts, then
    one step per token, each token drawn by :func:`draw_tokens` from the LM head at the last position.
    With ``step_decoder`` the steps run through :class:`~rlhf_lightning.decoding.StepDecoder` where it
    applies (a plain Llama-family model), and a prompt that occurs several times in the batch is encoded
    once; else everything runs through the model's own layers.

    Returns ``(responses, response_mask)`` of shape ``(batch, max_new_tokens)``: tokens after the first
    EOS are pad and masked out; the pad token itself is never sampled (unless it doubles as EOS). Stops
    early once every row has ended.
    """
    suppress = suppressed_token(pad_token_id, eos_token_id)
    was_training = model.training
    model.eval()
    body = backbone(model)
    # transformers 5 names the KV cache `cache`; 4.x names it `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    mask = attention_mask.long()
    fast = step_decoder and max_new_tokens > 1 and decoding.supports(model)
    # with the step decoder a prompt repeated in the batch (K samples of it) is encoded once
    prompts, rows = decoding.distinct_rows(input_ids, mask) if fast else ((input_ids, mask), None)
    positions = position_ids(prompts[1])
    out = body(input_ids=prompts[0], attention_mask=prompts[1], position_ids=positions, use_cache=True)
    hidden, step_positions = out.last_hidden_state[:, -1], positions[:, -1:] + 1
    if rows is not None:  # back to one row per sample
        hidden, step_positions = hidden[rows], step_positions[rows]
    decoder = None
    if fast:
        decoder = decoding.StepDecoder(model, getattr(out, cache_arg), mask, max_new_tokens - 1, rows)
        del out
    # the decoder's packed head where it has one: the plain head's cast copy would go unused
    if decoder is not None and decoder.head is not None:
        head = decoder.logits
    else:
        head = _decoding_head(model, input_ids.device.type)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        logits = head(hidden)
        token = draw_tokens(logits, temperature, top_k, top_p, suppress, do_sample).masked_fill_(
            done, pad_token_id
        )
        tokens.append(token)
        done |= token == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        if decoder is not None:
            hidden = decoder.step(token, step_positions)
        else:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = body(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=step_positions,
                use_cache=True,
                **{cache_arg: getattr(out, cache_arg)},
            )
            hidden = out.last_hidden_state[:, -1]
        step_positions = step_positions + 1
    model.train(was_training)
    responses = torch.stack(tokens, dim=1)
    if responses.shape[1] < max_new_tokens:  # every row stopped early
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]), pad_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return mask_after_eos(responses, eos_token_id, pad_token_id)
