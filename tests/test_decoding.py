"""``rlhf_lightning.decoding``: the written-out decoding step gives transformers' numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_lightning.decoding import StepDecoder, packed_linear, supports
from rlhf_lightning.lm import position_ids, sample
from rlhf_lightning.models import LoraOptions, apply_lora, backbone, load_causal_lm

STEPS = 6


def _prompts():
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (5, 7), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding of different lengths
    mask[3, :1] = 0
    return prompts.masked_fill(mask == 0, 0), mask


def _both_ways(model, autocast: bool):
    """Logits of STEPS decoding steps fed the same tokens, by transformers' layers and by StepDecoder."""
    prompts, mask = _prompts()
    body = backbone(model)
    feed = torch.randint(3, 250, (prompts.shape[0], STEPS), generator=torch.Generator().manual_seed(1))
    theirs, ours = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        positions = position_ids(mask)
        out = body(input_ids=prompts, attention_mask=mask, position_ids=positions, use_cache=True)
        decoder = StepDecoder(model, out.cache, mask, STEPS)
        step_mask, step_positions = mask, positions[:, -1:] + 1
        for i in range(STEPS):
            token = feed[:, i]
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            out = body(
                input_ids=token[:, None],
                attention_mask=step_mask,
                position_ids=step_positions,
                use_cache=True,
                cache=out.cache,
            )
            theirs.append(model.lm_head(out.last_hidden_state[:, -1]).float())
            ours.append(decoder.logits(decoder.step(token, step_positions)).float())
            step_positions = step_positions + 1
    return torch.stack(theirs), torch.stack(ours)


def test_steps_give_transformers_logits_in_fp32():
    model = load_causal_lm("tiny:llama").eval()
    theirs, ours = _both_ways(model, autocast=False)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_steps_give_transformers_logits_under_bf16_autocast():
    model = load_causal_lm("tiny:llama").eval()
    theirs, ours = _both_ways(model, autocast=True)
    # transformers runs attention in bf16, the decoder in fp32; both round their projections to bf16
    scale = theirs.abs().max()
    assert float((ours - theirs).abs().max()) < 0.02 * scale
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) > 0.9


def _sample_both_ways(model, prompts, mask, max_new_tokens: int):
    """``sample`` with and without the step decoder, from the same random state."""
    runs = []
    for step_decoder in (True, False):
        torch.manual_seed(0)
        runs.append(
            sample(
                model,
                prompts,
                mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=1,
                pad_token_id=0,
                temperature=0.7,
                step_decoder=step_decoder,
            )
        )
    return runs


def test_sampled_tokens_are_those_of_transformers_layers():
    prompts, mask = _prompts()
    runs = _sample_both_ways(load_causal_lm("tiny:llama").eval(), prompts, mask, max_new_tokens=12)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_packed_linear_is_the_linear_map():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 64, generator=g), torch.randn(8, 64, generator=g)
    torch.testing.assert_close(packed_linear(weight, 8, torch.float32)(x), F.linear(x, weight))
    bf16 = packed_linear(weight, 8, torch.bfloat16)(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), F.linear(x.bfloat16(), weight.bfloat16()).float())


def test_only_plain_llama_models_take_the_written_out_step():
    model = load_causal_lm("tiny:llama")
    assert supports(model)
    assert not supports(apply_lora(load_causal_lm("tiny:llama"), LoraOptions(r=4), task="CAUSAL_LM"))
    biased = load_causal_lm("tiny:llama")
    layer = biased.model.layers[0].self_attn
    layer.q_proj = torch.nn.Linear(layer.q_proj.in_features, layer.q_proj.out_features, bias=True)
    assert not supports(biased)


@pytest.mark.parametrize("step_decoder", [True, False])
def test_a_model_without_the_fast_step_samples_the_same_way(step_decoder):
    """LoRA-wrapped policies fall back to transformers' layers, whatever ``step_decoder`` says."""
    model = apply_lora(load_causal_lm("tiny:llama"), LoraOptions(r=4), task="CAUSAL_LM").eval()
    prompts, mask = _prompts()
    torch.manual_seed(0)
    responses, response_mask = sample(
        model, prompts, mask, max_new_tokens=5, eos_token_id=1, pad_token_id=0, step_decoder=step_decoder
    )
    assert responses.shape == response_mask.shape == (5, 5)


def test_distinct_rows_index_back_to_the_batch():
    from rlhf_lightning.decoding import distinct_rows

    prompts, mask = _prompts()
    (ids, m), rows = distinct_rows(prompts, mask)
    assert rows is None and ids is prompts and m is mask  # nothing repeats
    batch, batch_mask = prompts.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    (ids, m), rows = distinct_rows(batch, batch_mask)
    assert len(ids) == len(prompts) and m.dtype == batch_mask.dtype
    assert torch.equal(ids[rows], batch) and torch.equal(m[rows], batch_mask)


def test_a_repeated_prompt_is_encoded_once_and_samples_as_before():
    """K samples of each prompt: the step decoder encodes each prompt once and draws the same tokens as
    transformers' layers fed the whole batch."""
    model = load_causal_lm("tiny:llama").eval()
    prompts, mask = _prompts()
    batch, batch_mask = prompts.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    encoded = []
    hook = backbone(model).register_forward_hook(lambda module, args, kwargs, out: encoded.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)  # fmt: skip
    runs = _sample_both_ways(model, batch, batch_mask, max_new_tokens=8)
    hook.remove()
    assert encoded[0] == len(prompts)  # the step decoder's run: one row per distinct prompt
    assert encoded[1] == len(batch)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
