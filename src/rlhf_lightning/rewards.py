"""Reward functions: a Python object that scores (prompt, response) texts, in place of a reward model.

The PPO stage takes one by ``class_path`` (``model.reward_function``). Verifiable rewards (a unit test,
an exact answer, a format check) are written this way; so is the demo's simulated annotator, whose
gold score is the upper bound against which a learned reward model's PPO result can be read.
"""

from __future__ import annotations


class RewardFunction:
    """Scores responses from their text. Subclass it and implement :meth:`__call__`.

    PPO calls it once per rollout with the user's prompt texts (the last user turn), the decoded
    responses (special tokens removed) and whether each response ended with EOS. Scores are used as
    returned: put them on a scale of about one unit per noticeable difference, as PPO's KL coefficient
    and clip ranges assume (a learned reward model's scores are standardised the same way).
    """

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement __call__(prompts, responses, finished)"
        )


class AnnotatorReward(RewardFunction):
    """The simulated annotator's noise-free gold score (``rlhf_lightning.annotator``), standardised.

    Args:
        mean: Subtracted from the gold score.
        std: Divides the gold score after ``mean`` is subtracted.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        from rlhf_lightning.annotator import SimulatedAnnotator

        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = mean, std
        self.annotator = SimulatedAnnotator()

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
        return [
            (self.annotator.score(p, r, f) - self.mean) / self.std
            for p, r, f in zip(prompts, responses, finished)
        ]
