"""A simulated annotator: the "contractors" of the offline RLHF recipe.

Real RLHF hires people to rank responses. Offline, a transparent rubric stands in for them, so every
claim about the pipeline (the reward model learned the preference, PPO improved on SFT, the proxy
was gamed) can be checked against a gold score:

* warmth   - VADER sentiment of the response (Hutto & Gilbert 2014), credited only up to a cap:
             a friendly tone helps, gushing does not help more;
* on topic - share of the prompt's content words (instruction and form words left out, inflections
             matched by stem) that the response uses;
* concise  - full credit up to ``max_words`` words, then a linear decay; a near-empty answer gets none;
* finished - the response ended with EOS instead of running out of tokens;
* fresh    - share of distinct word bigrams (repetition is penalised).

Labels come from a Bradley-Terry draw, ``P(a > b) = sigmoid((g_a - g_b) / temperature)``, with the
temperature calibrated so two independent labels of a pair agree as often as InstructGPT's labelers
agreed with each other (72.6%, Ouyang et al. 2022); one label then matches the noise-free ranking about
83% of the time. The rubric is exploitable
the known way: a proxy reward model that learns "positive words are good" can be gamed by stuffing
sentiment words, which the capped warmth term does not pay for and the repetition and on-topic terms
punish, so the proxy rises while the gold score falls.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTGPT_AGREEMENT = 0.726  # inter-labeler agreement, Ouyang et al. 2022, section 3.4
_WORD = re.compile(r"[a-z']+")
_FUNCTION_WORDS = (
    "a an the and or but if of to in on for with about as at by from into over is are was were be been being "
    "it its this that these those i you he she we they me my your our their what which who whom how why when "
    "where can could should would will shall may might do does did give tell write make explain some any "
    "please short simple three few one two using like"
)
# Words that say what to do or in which form, not what to talk about: a request phrased in a new way
# ("in one sentence", "name a fact", "say something encouraging") must not ask the answer to repeat them.
_INSTRUCTION_WORDS = (
    "answer answers brief briefly short shortly quick quickly simple simply sentence sentences word words "
    "line lines paragraph paragraphs list point points summary summarize summarise example examples "
    "poem poems story stories note notes tip tips advice piece fact facts idea ideas thing things "
    "explain describe tell write give name share say show list compare define "
    "difference differences different differ between similar same "
    "year old ten twelve kid kids child children beginner beginners better best good get getting way ways "
    "know feel feeling nervous worried worry anxious kind friend friends someone somebody something "
    "encouraging encourage facing face about help please fun interesting tiny little "
    "first second third couple new keep make sure try using use"
)
_STOPWORDS = frozenset(_FUNCTION_WORDS.split()) | frozenset(_INSTRUCTION_WORDS.split())
_SUFFIXES = (("ies", "y"), ("es", ""), ("s", ""), ("ing", ""), ("ed", ""))


def stem(word: str) -> str:
    """A crude English stem: plural and verb endings off (``volcanoes`` -> ``volcano``, ``cooking`` -> ``cook``)."""
    word = word.removesuffix("'s")
    for suffix, replacement in _SUFFIXES:
        if suffix == "s" and word.endswith(("ss", "us", "is")):  # glass, virus, photosynthesis
            break
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + replacement
    return word


def topic_words(prompt: str) -> set[str]:
    """Stems of the prompt's content words: what the answer should be about."""
    return {stem(w) for w in words(prompt) if len(w) >= 3 and w not in _STOPWORDS}


def mentions(topic: str, response_words: set[str]) -> bool:
    """Whether a response uses the topic stem ``topic``, in any inflection (``magnet`` in ``magnetic``)."""
    return any(
        w == topic or stem(w) == topic or (len(topic) >= 4 and w.startswith(topic)) for w in response_words
    )


def words(text: str) -> list[str]:
    """Lower-case words of ``text``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Rubric:
    """Weights of the gold score and the knobs of its terms."""

    warmth: float = 1.0
    warmth_cap: float = 0.5
    on_topic: float = 1.5
    concise: float = 0.5
    max_words: int = 40
    finished: float = 1.0
    fresh: float = 1.0


class SimulatedAnnotator:
    """Scores (prompt, response) pairs with a rubric and labels comparisons with calibrated noise.

    Args:
        temperature: Bradley-Terry noise temperature of the labels (see :func:`calibrate_temperature`).
        rubric: Weights of the gold score.
    """

    def __init__(self, temperature: float = 0.3, rubric: Rubric | None = None):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.temperature = temperature
        self.rubric = rubric or Rubric()
        self._vader = SentimentIntensityAnalyzer()

    def components(self, prompt: str, response: str, finished: bool = True) -> dict[str, float]:
        """Each rubric term in [0, 1] (warmth in [-1, cap])."""
        r = self.rubric
        tokens = words(response)
        compound = self._vader.polarity_scores(response)["compound"]
        topic = topic_words(prompt)
        used = set(tokens)
        on_topic = sum(mentions(t, used) for t in topic) / len(topic) if topic else 1.0
        n = len(tokens)
        concise = (
            0.0
            if n < 3
            else 1.0
            if n <= r.max_words
            else max(0.0, 1.0 - (n - r.max_words) / (1.5 * r.max_words))
        )
        bigrams = list(zip(tokens, tokens[1:]))
        fresh = len(set(bigrams)) / len(bigrams) if bigrams else (1.0 if tokens else 0.0)
        return {
            "warmth": min(compound, r.warmth_cap),
            "on_topic": on_topic,
            "concise": concise,
            "finished": 1.0 if finished else 0.0,
            "fresh": fresh,
        }

    def score(self, prompt: str, response: str, finished: bool = True) -> float:
        """The gold score: the rubric's weighted sum."""
        return sum(self.weighted_components(prompt, response, finished).values())

    def weighted_components(self, prompt: str, response: str, finished: bool = True) -> dict[str, float]:
        """Each term's contribution to the gold score (its value times its weight): they sum to :meth:`score`."""
        c = self.components(prompt, response, finished)
        return {term: getattr(self.rubric, term) * value for term, value in c.items()}

    def deciding_term(
        self, prompt: str, responses: Sequence[str], finished: Sequence[bool] = (True, True)
    ) -> str:
        """The rubric term whose weighted difference between the two ``responses`` is largest: the one
        that decides the pair (where a reward model ranks a pair wrong, this says what it missed)."""
        a, b = (self.weighted_components(prompt, r, f) for r, f in zip(responses, finished, strict=True))
        return decisive_term(a, b)

    def prefer_probability(self, gold_a: float, gold_b: float) -> float:
        """Bradley-Terry probability that the annotator labels ``a`` better than ``b``."""
        return 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / self.temperature))

    def compare(self, gold_a: float, gold_b: float, rng: random.Random) -> bool:
        """One noisy label: ``True`` if ``a`` is preferred."""
        return rng.random() < self.prefer_probability(gold_a, gold_b)

    def rank(self, golds: Sequence[float], rng: random.Random) -> list[int]:
        """A noisy ranking (indices, best first): Plackett-Luce draws, whose pairwise marginals are Bradley-Terry."""
        remaining = list(range(len(golds)))
        order = []
        while remaining:
            weights = [math.exp(golds[i] / self.temperature) for i in remaining]
            pick = rng.choices(remaining, weights=weights)[0]
            order.append(pick)
            remaining.remove(pick)
        return order


def decisive_term(a: dict[str, float], b: dict[str, float]) -> str:
    """The rubric term whose weighted difference between two responses' terms
    (:meth:`SimulatedAnnotator.weighted_components`) is largest: the one that decides the pair."""
    return max(a, key=lambda term: abs(a[term] - b[term]))


def expected_agreement(gaps: Sequence[float], temperature: float) -> float:
    """Mean probability that two independent noisy labels of a pair agree, over pairs with gold gaps
    ``gaps``: ``p^2 + (1 - p)^2`` where ``p`` is the chance that one label is the noise-free one.

    This is what InstructGPT measured (labelers agreed with each other 72.6% of the time); it implies
    each label matches the noise-free ranking more often than that (see :func:`truth_agreement`).
    Tied pairs have no noise-free label and are left out.
    """
    probabilities = [1.0 / (1.0 + math.exp(-abs(g) / temperature)) for g in gaps if g != 0]
    return sum(p * p + (1 - p) * (1 - p) for p in probabilities) / len(probabilities)


def truth_agreement(gaps: Sequence[float], temperature: float) -> float:
    """Mean probability that one noisy label matches the noise-free ranking."""
    gaps = [g for g in gaps if g != 0]
    return sum(1.0 / (1.0 + math.exp(-abs(g) / temperature)) for g in gaps) / len(gaps)


def calibrate_temperature(gaps: Sequence[float], target: float = INSTRUCTGPT_AGREEMENT) -> float:
    """The temperature at which two labels of a pair agree ``target`` of the time (bisection)."""
    gaps = [g for g in gaps if g != 0]
    if not gaps:
        raise ValueError("cannot calibrate the annotator: every pair has the same gold score")
    return _solve_decreasing(lambda t: expected_agreement(gaps, t), target, 1e-4, 1e4)


def _solve_decreasing(f, target: float, low: float, high: float) -> float:
    """The ``x`` in ``[low, high]`` where the decreasing ``f`` crosses ``target`` (bisection on a log scale)."""
    for _ in range(200):
        mid = math.sqrt(low * high)
        if f(mid) > target:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


def accuracy_with_error(gaps: Sequence[float], sigma: float) -> float:
    """Expected pairwise accuracy of a score equal to the gold score plus independent Gaussian error of
    standard deviation ``sigma`` (gold units), over pairs with gold gaps ``gaps``: the mean of
    ``Phi(|gap| / (sigma * sqrt(2)))``. Reads a reward model's accuracy as an error on the gold scale.
    Tied pairs are left out."""
    gaps = [abs(g) for g in gaps if g != 0]
    if sigma <= 0:
        return 1.0
    return sum(0.5 * (1.0 + math.erf(g / (2.0 * sigma))) for g in gaps) / len(gaps)


def error_for_accuracy(gaps: Sequence[float], accuracy: float) -> float:
    """The Gaussian error ``sigma`` at which :func:`accuracy_with_error` equals ``accuracy`` (bisection)."""
    if not 0.5 < accuracy < 1.0:
        raise ValueError(f"accuracy must be in (0.5, 1), got {accuracy}")
    return _solve_decreasing(lambda sigma: accuracy_with_error(gaps, sigma), accuracy, 1e-6, 1e6)
