"""Every dataset format the project reads, turned into one canonical row per kind of data.

Formats are named the way TRL users know them:

* SFT: ``prompt``/``completion`` (strings, or message lists: "conversational"), ``messages``
  (the last turn is the assistant's), plain ``text``, and Anthropic-HH transcripts
  (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, in ``text``).
* Preferences: explicit ``prompt``/``chosen``/``rejected``; implicit-prompt ``chosen``/``rejected``
  (HH transcripts or message lists, split at the last assistant turn); an optional ``margin``; and
  K-way rankings, ``prompt`` + ``responses`` (best first, or ordered by ``ranks`` where 1 is best, or
  rated by ``scores`` where higher is better and tied scores give no comparison), with an optional
  ``finished`` list marking responses that ran out of tokens before their end (they are encoded
  without EOS, as a truncated PPO response is). Any other field that orders or rates the responses
  (``ranking``, ``rank``, ``order``, ``ratings``, ... see ``ORDERING_FIELDS``) is an error, since
  reading past it would train on an order the data did not mean; other extra columns are metadata,
  named once in a warning by :func:`~rlhf_lightning.data.sources.read_rows`.
* Prompts: any of the above, keeping only the prompt.

A prompt is either a string (used verbatim) or a list of ``{"role", "content"}`` messages (rendered
with the tokenizer's chat template). A bad row raises :class:`DataFormatError` naming the row and the
field; a row that carries no signal (identical responses) raises :class:`SkipRow`, which the
DataModules count and report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rlhf_lightning.errors import DataFormatError

Message = dict[str, str]
Prompt = str | list[Message]

SFT_FORMATS = "prompt/completion, messages, text (plain or Anthropic-HH transcript)"
PREFERENCE_FORMATS = (
    "prompt/chosen/rejected, chosen/rejected (implicit prompt), "
    "prompt/responses[/ranks or /scores] (K-way ranking or ratings)"
)
SFT_FIELDS = frozenset({"prompt", "completion", "messages", "text"})
PREFERENCE_FIELDS = frozenset(
    {"prompt", "chosen", "rejected", "margin", "responses", "ranks", "scores", "finished"}
)
# Fields that order or rate responses in conventions this reader does not apply (0- or 1-based, best or
# worst first, a permutation or its inverse, higher or lower is better): an error, never ignored.
ORDERING_FIELDS = frozenset(
    {
        "ranking", "rankings", "rank", "order", "ordering", "orders", "score", "rating", "ratings",
        "reward", "rewards", "preference", "preferences", "preferred", "winner", "best",
    }
)  # fmt: skip
PROMPT_FORMATS = "prompt, messages, text (HH transcript), or any SFT/preference format"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class SkipRow(Exception):
    """A well-formed row that carries no training signal; ``reason`` names the counted category."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SFTRow:
    """One demonstration: the model learns ``completion`` given ``prompt``."""

    prompt: Prompt
    completion: str


@dataclass
class PreferenceRow:
    """One prompt and K >= 2 responses ranked best first; ``margin`` applies to pairwise rows.

    ``finished[i]`` is false for a response that was cut off before its end (encoded without EOS).
    ``tiers[i]`` (non-decreasing, 0 = best) groups tied responses: two responses of one tier are not
    compared. ``None``: every response has its own tier (a strict ranking).
    """

    prompt: Prompt
    responses: list[str]
    margin: float | None = None
    finished: list[bool] | None = None
    tiers: list[int] | None = None


@dataclass
class PromptRow:
    """A prompt to generate from."""

    prompt: Prompt


def _fail(where: str, message: str) -> DataFormatError:
    return DataFormatError(f"{where}: {message}")


def _text(record: dict, field: str, where: str, allow_empty: bool = False) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise _fail(where, f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _fail(where, f"field {field!r} is empty")
    return value


def _messages(value: Any, field: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"field {field!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(where, f"{field}[{i}] must be a message with string 'role' and 'content'")
        if not isinstance(message.get("content"), str):
            raise _fail(where, f"{field}[{i}] ({message['role']}) has no string 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt(record: dict, field: str, where: str) -> Prompt:
    value = record[field]
    if isinstance(value, list):
        return _messages(value, field, where)
    return _text(record, field, where)


def _response(value: Any, field: str, where: str) -> str:
    """A response given as a string or as a list holding one assistant message."""
    if isinstance(value, list):
        messages = _messages(value, field, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _fail(where, f"field {field!r} must hold exactly one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise _fail(
            where, f"field {field!r} must be a string or an assistant message, got {type(value).__name__}"
        )
    if not value.strip():
        raise _fail(where, f"field {field!r} is empty")
    return value


def parse_hh(transcript: str, where: str, field: str = "text") -> list[Message]:
    """Split an Anthropic-HH transcript into user/assistant messages."""
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise _fail(
            where, f"field {field!r} is not an HH transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _is_hh(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _split_last_assistant(messages: list[Message], field: str, where: str) -> tuple[list[Message], str]:
    if messages[-1]["role"] != "assistant":
        raise _fail(
            where, f"the last message of {field!r} must be the assistant's, got {messages[-1]['role']!r}"
        )
    if not messages[-1]["content"].strip():
        raise _fail(where, f"the assistant's last message in {field!r} is empty")
    if len(messages) < 2:
        raise _fail(where, f"{field!r} has no prompt before the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def _check_fields(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise _fail(where, f"a row must be a JSON object, got {type(record).__name__}")
    return record


def to_sft_row(record: Any, where: str) -> SFTRow:
    """Read one demonstration in any SFT format."""
    record = _check_fields(record, where)
    if "prompt" in record and "completion" in record:
        return SFTRow(_prompt(record, "prompt", where), _response(record["completion"], "completion", where))
    if "messages" in record:
        prompt, completion = _split_last_assistant(
            _messages(record["messages"], "messages", where), "messages", where
        )
        return SFTRow(prompt, completion)
    if "text" in record:
        text = _text(record, "text", where)
        if _is_hh(text):
            prompt, completion = _split_last_assistant(parse_hh(text, where), "text", where)
            return SFTRow(prompt, completion)
        return SFTRow("", text)
    raise _fail(where, f"no SFT fields found (has {sorted(record)}); expected one of: {SFT_FORMATS}")


def _margin(record: dict, where: str) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"field 'margin' must be a number, got {type(value).__name__}")
    return float(value)


def _implicit(record: dict, where: str) -> tuple[Prompt, str, str]:
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not (_is_hh(chosen) and _is_hh(rejected)):
            raise _fail(
                where,
                "'chosen'/'rejected' without 'prompt' must be full HH transcripts or message lists "
                "(add a 'prompt' field for plain responses)",
            )
        chosen_msgs, rejected_msgs = parse_hh(chosen, where, "chosen"), parse_hh(rejected, where, "rejected")
    else:
        chosen_msgs, rejected_msgs = (
            _messages(chosen, "chosen", where),
            _messages(rejected, "rejected", where),
        )
    prompt, chosen_text = _split_last_assistant(chosen_msgs, "chosen", where)
    rejected_prompt, rejected_text = _split_last_assistant(rejected_msgs, "rejected", where)
    if prompt != rejected_prompt:
        raise _fail(
            where, "'chosen' and 'rejected' do not share the same conversation before the last answer"
        )
    return prompt, chosen_text, rejected_text


def _scores(record: dict, n: int, where: str) -> list[float]:
    scores = record["scores"]
    if (
        not isinstance(scores, list)
        or len(scores) != n
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)
    ):
        raise _fail(
            where, f"field 'scores' must be a list of {n} numbers (higher is better), one per response"
        )
    if any(x != x or x in (float("inf"), float("-inf")) for x in scores):
        raise _fail(where, f"field 'scores' must hold finite numbers, got {scores}")
    return [float(x) for x in scores]


def _check_ordering_fields(record: dict, where: str) -> None:
    """Refuse a field that orders or rates the responses in a convention this reader does not apply."""
    unknown = sorted(
        f for f in record if f not in PREFERENCE_FIELDS and f.lower() in ORDERING_FIELDS | {"ranks", "scores"}
    )
    if "scores" in record and "responses" not in record:
        unknown.append("scores")
    if unknown:
        fix = (
            "rename it to 'ranks' (a list, 1 = best) or 'scores' (a list, higher is better), or list "
            "'responses' best first and drop it"
            if "responses" in record
            else "'chosen'/'rejected' already order the pair: drop it (a strength of preference goes in 'margin')"
        )
        raise _fail(
            where,
            f"field {unknown[0]!r} orders or rates the responses in a convention this reader does not apply; {fix}",
        )


def _ranked(record: dict, where: str) -> tuple[list[str], list[bool] | None, list[int] | None]:
    """Responses best first, their ``finished`` flags (if given) and tie tiers (with ``scores``)."""
    responses = record["responses"]
    if not isinstance(responses, list):
        raise _fail(where, f"field 'responses' must be a list, got {type(responses).__name__}")
    if len(responses) < 2:
        raise _fail(where, f"a ranking needs at least 2 responses, got {len(responses)}")
    texts = [_response(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
    finished = record.get("finished")
    if finished is not None and (
        not isinstance(finished, list)
        or len(finished) != len(texts)
        or not all(isinstance(f, bool) for f in finished)
    ):
        raise _fail(where, f"field 'finished' must be a list of {len(texts)} booleans, one per response")
    if "ranks" in record and "scores" in record:
        raise _fail(where, "fields 'ranks' and 'scores' both order the responses; keep one")
    if "scores" in record:
        scores = _scores(record, len(texts), where)
        if len(set(scores)) == 1:
            raise SkipRow("every response has the same score")
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        distinct = sorted(set(scores), reverse=True)
        tiers = [distinct.index(scores[i]) for i in order]
        return (
            [texts[i] for i in order],
            None if finished is None else [finished[i] for i in order],
            tiers if len(distinct) < len(texts) else None,
        )
    ranks = record.get("ranks")
    if ranks is None:
        return texts, finished, None
    if not isinstance(ranks, list) or len(ranks) != len(texts):
        raise _fail(
            where, f"field 'ranks' must be a list of {len(texts)} integers (1 = best), one per response"
        )
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise _fail(where, "field 'ranks' must hold integers (1 = best)")
    if len(set(ranks)) != len(ranks):
        raise _fail(where, f"field 'ranks' has ties {ranks}; a ranking must order every response strictly")
    order = sorted(range(len(texts)), key=lambda i: ranks[i])
    return [texts[i] for i in order], None if finished is None else [finished[i] for i in order], None


def to_preference_row(record: Any, where: str) -> PreferenceRow:
    """Read one comparison or ranking in any preference format."""
    record = _check_fields(record, where)
    _check_ordering_fields(record, where)
    tiers = None
    if "responses" in record:
        if "prompt" not in record:
            raise _fail(where, "a ranking ('responses') needs a 'prompt' field")
        prompt = _prompt(record, "prompt", where)
        responses, finished, tiers = _ranked(record, where)
    elif "chosen" in record and "rejected" in record:
        finished = None
        if "prompt" in record:
            prompt = _prompt(record, "prompt", where)
            responses = [
                _response(record["chosen"], "chosen", where),
                _response(record["rejected"], "rejected", where),
            ]
        else:
            prompt, chosen, rejected = _implicit(record, where)
            responses = [chosen, rejected]
    else:
        missing = "rejected" if "chosen" in record else "chosen"
        raise _fail(
            where, f"no {missing!r} field (has {sorted(record)}); expected one of: {PREFERENCE_FORMATS}"
        )
    if len({r.strip() for r in responses}) < len(responses):
        raise SkipRow("identical responses")
    return PreferenceRow(prompt, responses, _margin(record, where), finished, tiers)


FIELDS_READ = {
    to_sft_row: SFT_FIELDS,
    to_preference_row: PREFERENCE_FIELDS,
}  # for the ignored-columns warning


def to_prompt_row(record: Any, where: str) -> PromptRow:
    """Read the prompt of a row in any format."""
    record = _check_fields(record, where)
    if "prompt" in record:
        return PromptRow(_prompt(record, "prompt", where))
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise _fail(where, "'messages' holds only an assistant turn; there is no prompt")
        return PromptRow(messages)
    for field in ("text", "chosen"):
        if field in record and isinstance(record[field], str) and _is_hh(record[field]):
            return PromptRow(_split_last_assistant(parse_hh(record[field], where, field), field, where)[0])
    raise _fail(where, f"no prompt found (has {sorted(record)}); expected one of: {PROMPT_FORMATS}")
