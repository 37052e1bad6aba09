"""The rollout's typed experience: minibatches trim padding and keep every field aligned."""

import pytest
import torch

from rlhf_lightning.modules.ppo_iteration import NonFiniteCounter
from rlhf_lightning.rl.experience import Experience


def _experience() -> Experience:
    # 3 episodes; prompts left-padded to 3 columns (row 0 has a 1-token prompt), responses of 3, 1 and 2 tokens
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    mask = attention[:, 3:].bool()
    per_token = torch.arange(9, dtype=torch.float).view(3, 3) * mask
    return Experience(
        input_ids=torch.arange(18).view(3, 6),
        attention_mask=attention,
        start=3,
        responses=torch.arange(100, 109).view(3, 3),
        mask=mask,
        logprobs=per_token,
        raw_scores=torch.tensor([1.0, 2.0, 3.0]),
        scores=torch.tensor([0.1, 0.2, 0.3]),
        kl=per_token / 10,
        entropy=per_token,
        non_score_reward=-per_token / 100,
        advantages=per_token + 1,
        prompt_texts=["a", "b", "c"],
    )


def test_minibatch_trims_pad_columns_on_both_sides_and_keeps_rows_aligned():
    exp = _experience()
    mb = exp.minibatch(torch.tensor([2, 1]))
    # rows 2 and 1: prompts start at column 0 (row 2), responses are at most 2 tokens long
    assert mb.start == 3
    assert mb.input_ids.tolist() == [[12, 13, 14, 15, 16], [6, 7, 8, 9, 10]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert mb.responses.tolist() == [[106, 107], [103, 104]]
    assert mb.mask.tolist() == [[True, True], [True, False]]
    assert mb.logprobs.tolist() == [[6.0, 7.0], [3.0, 0.0]]
    assert mb.advantages.tolist() == [[7.0, 8.0], [4.0, 1.0]]
    assert mb.scores.tolist() == pytest.approx([0.3, 0.2])
    assert mb.prompt_texts == ["c", "b"]
    assert mb.values is None and mb.returns is None and mb.ref_logprobs is None


def test_minibatch_drops_prompt_columns_that_are_padding_in_every_row():
    mb = _experience().minibatch(torch.tensor([0]))
    assert mb.start == 1  # two all-pad prompt columns dropped
    assert mb.input_ids.tolist() == [[2, 3, 4, 5]]
    assert mb.responses.shape == (1, 3)


def test_metrics_are_means_over_episodes_of_per_episode_sums():
    exp = _experience()
    metrics = exp.metrics()
    kl = (exp.kl.sum(-1)).mean()
    assert metrics["objective/kl"] == pytest.approx(float(kl))
    assert metrics["objective/response_length"] == pytest.approx(2.0)
    assert metrics["objective/rlhf_reward"] == pytest.approx(
        float((exp.scores + exp.non_score_reward.sum(-1)).mean())
    )


def test_is_finite_watches_what_the_update_reads():
    exp = _experience()
    assert exp.is_finite()
    exp.advantages[0, 0] = float("nan")
    assert not exp.is_finite()


def test_nonfinite_counter_stops_after_the_limit_in_a_row_and_round_trips():
    counter = NonFiniteCounter(limit=2)
    assert counter.rollout(False)  # 1 in a row: go on
    assert counter.rollout(True)  # reset
    assert counter.rollout(False)
    assert not counter.rollout(False)  # 2 in a row: stop
    assert (counter.rollouts, counter.consecutive) == (3, 2)
    restored = NonFiniteCounter(limit=2)
    restored.load_state_dict(counter.state_dict())
    assert restored.state_dict() == counter.state_dict()


def test_iterations_in_fit_is_bounded_by_epochs_or_optimizer_steps():
    from rlhf_lightning.errors import ConfigurationError
    from rlhf_lightning.modules.ppo_iteration import iterations_in_fit

    assert iterations_in_fit(2, 8, None, 0, 4, 8) == 16  # 8 batches x 2 epochs
    # 32 episodes in minibatches of 8 x 2 PPO epochs = 8 optimizer steps per iteration: 20 steps end it in 3
    assert iterations_in_fit(2, 8, 20, 32, 2, 8) == 3
    assert iterations_in_fit(-1, 8, 80, 32, 2, 8) == 10
    with pytest.raises(ConfigurationError, match="needs a bounded run"):
        iterations_in_fit(-1, 8, -1, 32, 2, 8)
