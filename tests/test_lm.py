"""The forward-pass helpers of ``rlhf_lightning.lm``: EOS masking, padding positions, log-probs, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlhf_lightning.lm import (
    entropy_from_logits,
    head_logprobs,
    hidden_states,
    last_token_index,
    logprobs_from_logits,
    mask_after_eos,
    position_ids,
    response_logprobs,
    sample,
)
from rlhf_lightning.models import load_causal_lm

EOS, PAD = 7, 0


def test_mask_after_eos():
    responses = torch.tensor(
        [
            [5, EOS, 3, EOS, 9],  # tokens after the first EOS (including a second EOS) become pad
            [1, 2, 3, 4, 5],  # no EOS: everything kept
            [EOS, 1, 2, 3, 4],  # EOS first: only it is kept
            [1, 2, 3, 4, EOS],  # EOS last
        ]
    )
    out, mask = mask_after_eos(responses, EOS, PAD)
    assert out.tolist() == [
        [5, EOS, PAD, PAD, PAD],
        [1, 2, 3, 4, 5],
        [EOS, PAD, PAD, PAD, PAD],
        [1, 2, 3, 4, EOS],
    ]
    assert mask.tolist() == [
        [True, True, False, False, False],
        [True] * 5,
        [True, False, False, False, False],
        [True] * 5,
    ]
    assert mask.dtype == torch.bool
    # Idempotent: masking an already masked batch changes nothing.
    again, mask_again = mask_after_eos(out, EOS, PAD)
    assert torch.equal(again, out) and torch.equal(mask_again, mask)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.bool()).tolist() == [2, 4, 0]
    # Left-padded prompt followed by a right-padded response (what PPO scores).
    both = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert last_token_index(both).tolist() == [3, 4]


def test_position_ids_count_real_tokens():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    right = torch.tensor([[1, 1, 1, 0, 0]])
    assert position_ids(right).tolist() == [[0, 1, 2, 2, 2]]


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = load_causal_lm("tiny:llama").eval()
    with torch.no_grad():  # a random init is nearly uniform; sharpen it so errors would show
        model.get_input_embeddings().weight.mul_(50)
    return model


def test_response_logprobs_match_full_forward(tiny_lm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (3, 10), generator=g)
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 5 + [0] * 5])
    ids = ids.masked_fill(mask == 0, PAD)
    start = 4
    got = response_logprobs(tiny_lm, ids, mask, start)
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    expected = (
        F.log_softmax(logits.float(), -1)[:, start - 1 : -1].gather(-1, ids[:, start:, None]).squeeze(-1)
    )
    assert got.shape == (3, 6)
    valid = mask[:, start:].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert expected.exp().max() > 0.02  # the sharpened model is far from uniform (1/259)

    # Temperature divides the logits.
    hot = response_logprobs(tiny_lm, ids, mask, start, temperature=2.0)
    expected_hot = logprobs_from_logits(logits[:, start - 1 : -1], ids[:, start:], 2.0)
    torch.testing.assert_close(hot[valid], expected_hot[valid], atol=1e-5, rtol=1e-5)


def test_response_logprobs_in_row_groups_are_the_same_numbers(tiny_lm):
    """Without gradients the LM head runs over groups of rows (memory stays flat); the numbers do not move."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    vocab = tiny_lm.get_output_embeddings().out_features
    with torch.no_grad():
        whole = response_logprobs(tiny_lm, ids, mask, 3)
        one_row_at_a_time = response_logprobs(tiny_lm, ids, mask, 3, max_logits=6 * vocab)
        two_rows = response_logprobs(tiny_lm, ids, mask, 3, max_logits=2 * 6 * vocab)
    torch.testing.assert_close(one_row_at_a_time, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two_rows, whole, atol=1e-6, rtol=1e-6)
    # With gradients the rows stay together (autograd keeps every group's logits anyway) and gradients flow.
    assert response_logprobs(tiny_lm, ids, mask, 3, max_logits=1).requires_grad


def test_head_logprobs_with_entropy_in_row_groups_match_the_whole_batch(tiny_lm):
    """The PPO rollout's log-probs and entropies, computed one row group at a time, are the whole batch's."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 250, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    vocab = tiny_lm.get_output_embeddings().out_features
    with torch.no_grad():
        hidden = hidden_states(tiny_lm, ids, mask)[:, 2:-1]
        logits = tiny_lm(input_ids=ids, attention_mask=mask).logits[:, 2:-1].float()
        logprobs, entropy = head_logprobs(
            tiny_lm, hidden, ids[:, 3:], 0.7, PAD, max_logits=2 * 6 * vocab, with_entropy=True
        )
    torch.testing.assert_close(
        logprobs, logprobs_from_logits(logits, ids[:, 3:], 0.7, PAD), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(entropy, entropy_from_logits(logits, 0.7, PAD), atol=1e-5, rtol=1e-5)


def test_response_logprobs_left_padding_invariant(tiny_lm):
    """A left-padded row gives the same response log-probs as the same row unpadded."""
    g = torch.Generator().manual_seed(1)
    row = torch.randint(3, 250, (1, 8), generator=g)
    unpadded = response_logprobs(tiny_lm, row, torch.ones_like(row), 5)
    padded = torch.cat([torch.full((1, 3), PAD), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], dim=1)
    torch.testing.assert_close(response_logprobs(tiny_lm, padded, mask, 8), unpadded, atol=1e-5, rtol=1e-5)


def _biased_lm(pad_bias: float, eos_bias: float):
    """tiny:llama with an output bias that makes pad overwhelmingly likely and EOS likely."""
    from rlhf_lightning.models import tiny_tokenizer

    tok = tiny_tokenizer()
    model = load_causal_lm("tiny:llama").eval()
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tok.pad_token_id] = pad_bias
        head.bias[tok.eos_token_id] = eos_bias
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model, tok


@pytest.mark.parametrize("eos_bias", [1.5, 12.0])  # some rows end early / every row ends at once
def test_sample_never_emits_pad_and_masks_after_eos(eos_bias):
    model, tok = _biased_lm(pad_bias=30.0, eos_bias=eos_bias)
    model.train()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (16, 5), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[::2, :2] = 0  # left padding on every other row
    prompts = prompts.masked_fill(prompt_mask == 0, tok.pad_token_id)
    max_new = 12
    torch.manual_seed(0)
    responses, mask = sample(
        model,
        prompts,
        prompt_mask,
        max_new_tokens=max_new,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert model.training  # the mode is restored
    assert responses.shape == mask.shape == (16, max_new)
    assert mask.dtype == torch.bool
    # The pad token is never sampled: it appears only where the mask is off, and fills all of it.
    assert not (responses[mask] == tok.pad_token_id).any()
    assert (responses[~mask] == tok.pad_token_id).all()
    # Masks are exactly what mask_after_eos gives.
    again, mask_again = mask_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(again, responses) and torch.equal(mask_again, mask)
    # Each mask is a prefix ending at the first EOS, or full length when no EOS was emitted.
    lengths = mask.sum(-1)
    assert torch.equal(mask, torch.arange(max_new)[None, :] < lengths[:, None])
    has_eos = (responses == tok.eos_token_id).any(-1)
    assert ((lengths == max_new) | has_eos).all()
    ended = torch.nonzero(has_eos).flatten()
    assert (responses[ended, lengths[ended] - 1] == tok.eos_token_id).all()
    if eos_bias > 10:
        # every row stopped early: the responses were right-filled with pad
        assert has_eos.all() and int(lengths.max()) < max_new
    else:
        assert has_eos.any() and (~has_eos).any()  # both kinds of rows


def _sampled_ranks(model, **kwargs) -> torch.Tensor:
    """Rank (0 = most likely) of one sampled token per row, under the model's full distribution."""
    from rlhf_lightning.lm import response_logits
    from rlhf_lightning.models import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = torch.randint(3, 250, (128, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    torch.manual_seed(0)
    responses, _ = sample(
        model,
        prompts,
        mask,
        max_new_tokens=1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    full = torch.cat([prompts, responses[:, :1]], dim=1)
    with torch.no_grad():
        logits = response_logits(model, full, torch.ones_like(full), prompts.shape[1])[:, 0]
    return (logits > logits.gather(-1, responses[:, :1])).sum(-1)


def test_sample_top_k_restricts_to_top_tokens():
    ranks = _sampled_ranks(load_causal_lm("tiny:llama").eval(), temperature=1.0, top_k=5)
    assert int(ranks.max()) < 5


@pytest.mark.parametrize("checkpoint_defaults", [{}, {"top_k": 5}, {"top_p": 0.05}])
def test_sample_without_top_k_uses_full_distribution(checkpoint_defaults):
    model = load_causal_lm("tiny:llama").eval()  # a random init: nearly uniform over 258 tokens
    for key, value in checkpoint_defaults.items():  # as a checkpoint's generation_config.json may set them
        setattr(model.generation_config, key, value)
    ranks = _sampled_ranks(model, temperature=1.0, top_k=0, top_p=1.0)
    # Sampling from all ~258 near-equally likely tokens: ~80% of draws fall outside the 50 most likely.
    assert float((ranks >= 50).float().mean()) > 0.5


def test_draw_tokens_follows_the_sampling_distribution_and_its_cuts():
    from rlhf_lightning.lm import draw_tokens

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).expand(40_000, 5)
    torch.manual_seed(0)

    def frequencies(**kwargs):
        return torch.bincount(draw_tokens(logits, **kwargs), minlength=5).float() / logits.shape[0]

    full = torch.softmax(logits[0] / 0.7, -1)
    torch.testing.assert_close(frequencies(temperature=0.7), full, atol=0.01, rtol=0)
    no_first = torch.softmax(logits[0, 1:], -1)  # token 0 suppressed, the rest renormalised
    torch.testing.assert_close(frequencies(suppress=0)[1:], no_first, atol=0.01, rtol=0)
    assert frequencies(suppress=0)[0] == 0
    top2 = torch.softmax(logits[0, :2], -1)
    torch.testing.assert_close(frequencies(top_k=2), torch.cat([top2, torch.zeros(3)]), atol=0.01, rtol=0)
    # nucleus 0.8: the smallest most-probable set reaching 0.8 is tokens 0-2 (0.52, 0.19, 0.12 -> 0.83)
    p = torch.softmax(logits[0], -1)
    nucleus = torch.cat([p[:3] / p[:3].sum(), torch.zeros(2)])
    torch.testing.assert_close(frequencies(top_p=0.8), nucleus, atol=0.01, rtol=0)
    assert torch.equal(draw_tokens(logits[:3], do_sample=False), torch.zeros(3, dtype=torch.long))


def test_greedy_sample_matches_transformers_generate():
    from transformers import GenerationConfig

    model = load_causal_lm("tiny:llama").eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (4, 6), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding
    prompts = prompts.masked_fill(mask == 0, 0)
    ours, _ = sample(model, prompts, mask, max_new_tokens=8, eos_token_id=1, pad_token_id=0, do_sample=False)
    config = GenerationConfig(
        max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    theirs = model.generate(input_ids=prompts, attention_mask=mask, generation_config=config)[:, 6:]
    theirs, _ = mask_after_eos(theirs, 1, 0)
    assert torch.equal(ours, theirs)
