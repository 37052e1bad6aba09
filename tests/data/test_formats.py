"""Every supported SFT and preference format maps to one canonical row; bad rows name row and field."""

from __future__ import annotations

import re

import pytest

from rlhf_lightning.data.formats import (
    DataFormatError,
    PreferenceRow,
    SFTRow,
    SkipRow,
    parse_hh,
    to_preference_row,
    to_prompt_row,
    to_sft_row,
)

WHERE = "train.jsonl row 7"
LOC = re.escape(WHERE)

USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4."}
HH = "\n\nHuman: What is 2+2?\n\nAssistant: 4."


# -- SFT -----------------------------------------------------------------------------------------


def test_sft_prompt_completion_strings_are_kept_verbatim():
    row = to_sft_row({"prompt": "Q: 2+2?\nA: ", "completion": "4"}, WHERE)
    assert row == SFTRow(prompt="Q: 2+2?\nA: ", completion="4")


def test_sft_plain_text_has_empty_prompt():
    row = to_sft_row({"text": "Once upon a time."}, WHERE)
    assert row == SFTRow(prompt="", completion="Once upon a time.")


def test_sft_conversational_forms_give_the_same_row():
    expected = SFTRow(prompt=[USER], completion="4.")
    conversational = to_sft_row({"prompt": [USER], "completion": [ASSISTANT]}, WHERE)
    messages = to_sft_row({"messages": [USER, ASSISTANT]}, WHERE)
    hh = to_sft_row({"text": HH}, WHERE)
    assert conversational == expected
    assert messages == expected
    assert hh == expected


def test_sft_message_prompt_with_string_completion():
    assert to_sft_row({"prompt": [USER], "completion": "4."}, WHERE) == SFTRow([USER], "4.")


def test_sft_multi_turn_keeps_history_in_prompt():
    history = [
        {"role": "system", "content": "Be brief."},
        USER,
        ASSISTANT,
        {"role": "user", "content": "And 3+3?"},
    ]
    row = to_sft_row({"messages": [*history, {"role": "assistant", "content": "6."}]}, WHERE)
    assert row == SFTRow(history, "6.")
    hh = to_sft_row({"text": HH + "\n\nHuman: And 3+3?\n\nAssistant: 6."}, WHERE)
    assert hh == SFTRow([USER, ASSISTANT, {"role": "user", "content": "And 3+3?"}], "6.")


def test_sft_extra_message_keys_are_dropped():
    row = to_sft_row({"messages": [{**USER, "name": "bob"}, {**ASSISTANT, "weight": 1}]}, WHERE)
    assert row == SFTRow([USER], "4.")


def test_parse_hh_splits_turns_and_strips():
    assert parse_hh("Human:  hi \n\nAssistant:  hello ", WHERE) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": 3, "completion": "x"}, "'prompt'"),
        ({"prompt": "x", "completion": 3}, "'completion'"),
        ({"prompt": "x", "completion": "  "}, "'completion'"),
        ({"prompt": "   ", "completion": "x"}, "'prompt'"),
        ({"text": ["not", "a", "string"]}, "'text'"),
        ({"messages": []}, "'messages'"),
        ({"messages": "hello"}, "'messages'"),
        ({"messages": [USER]}, "'messages'"),  # last turn is not the assistant's
        ({"messages": [ASSISTANT]}, "'messages'"),  # no prompt before the answer
        ({"messages": [USER, {"role": "assistant", "content": " "}]}, "'messages'"),
        ({"messages": [USER, {"role": "assistant"}]}, r"messages\[1\]"),
        ({"messages": [{"content": "x"}, ASSISTANT]}, r"messages\[0\]"),
        ({"prompt": [USER], "completion": [USER]}, "'completion'"),  # not an assistant message
        ({"prompt": [USER], "completion": [ASSISTANT, ASSISTANT]}, "'completion'"),
        ({"text": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye"}, "'text'"),  # ends on Human
        ({"prompt": "only a prompt"}, r"has \['prompt'\].*prompt/completion"),  # missing completion
        ({"completion": "x"}, r"has \['completion'\].*prompt/completion"),
    ],
)
def test_sft_errors_name_row_and_field(record, field):
    with pytest.raises(DataFormatError, match=f"^{LOC}: .*{field}"):
        to_sft_row(record, WHERE)


def test_sft_missing_fields_lists_formats():
    with pytest.raises(
        DataFormatError, match=rf"^{LOC}: no SFT fields found \(has \['question'\]\).*prompt/completion"
    ):
        to_sft_row({"question": "x"}, WHERE)


def test_sft_non_object_row():
    with pytest.raises(DataFormatError, match=f"^{LOC}: a row must be a JSON object, got list"):
        to_sft_row(["prompt", "completion"], WHERE)


# -- preferences ---------------------------------------------------------------------------------


def test_preference_explicit_strings():
    row = to_preference_row({"prompt": "Q: ", "chosen": "good", "rejected": "bad"}, WHERE)
    assert row == PreferenceRow("Q: ", ["good", "bad"], None)


def test_preference_forms_of_one_comparison_agree():
    expected = PreferenceRow([USER], ["4.", "5."], None)
    wrong = {"role": "assistant", "content": "5."}
    forms = [
        {"prompt": [USER], "chosen": "4.", "rejected": "5."},
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [wrong]},
        {"chosen": HH, "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
        {"chosen": [USER, ASSISTANT], "rejected": [USER, wrong]},
        {"prompt": [USER], "responses": ["4.", "5."]},
        {"prompt": [USER], "responses": [[ASSISTANT], [wrong]]},
        {"prompt": [USER], "responses": ["5.", "4."], "ranks": [2, 1]},
    ]
    for record in forms:
        assert to_preference_row(record, WHERE) == expected, record


def test_preference_k_way_best_first_and_ranks_agree():
    best_first = to_preference_row({"prompt": "p", "responses": ["a", "b", "c", "d"]}, WHERE)
    ranked = to_preference_row(
        {"prompt": "p", "responses": ["c", "a", "d", "b"], "ranks": [3, 1, 4, 2]}, WHERE
    )
    sparse_ranks = to_preference_row(
        {"prompt": "p", "responses": ["c", "a", "d", "b"], "ranks": [30, 1, 99, 7]}, WHERE
    )
    assert best_first == ranked == sparse_ranks == PreferenceRow("p", ["a", "b", "c", "d"], None)


def test_preference_margin_is_parsed():
    assert (
        to_preference_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, WHERE).margin == 2.0
    )
    assert isinstance(
        to_preference_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, WHERE).margin, float
    )
    assert to_preference_row({"chosen": HH, "rejected": HH + "!", "margin": 0.5}, WHERE).margin == 0.5
    assert to_preference_row({"prompt": "p", "responses": ["a", "b"], "margin": -1.5}, WHERE).margin == -1.5
    assert (
        to_preference_row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": None}, WHERE).margin
        is None
    )


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 2]}, "'ranks' has ties"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1]}, "'ranks'"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1.0, 2.0]}, "'ranks'"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [True, False]}, "'ranks'"),
        ({"prompt": "p", "responses": ["a"]}, "at least 2 responses, got 1"),
        ({"prompt": "p", "responses": []}, "at least 2 responses, got 0"),
        ({"prompt": "p", "responses": "a"}, "'responses' must be a list, got str"),
        ({"prompt": "p", "responses": ["a", " "]}, r"'responses\[1\]' is empty"),
        ({"prompt": "p", "responses": ["a", 3]}, r"'responses\[1\]' must be a string"),
        ({"responses": ["a", "b"]}, "needs a 'prompt' field"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "\n"}, "'rejected' is empty"),
        ({"prompt": "p", "chosen": "a"}, "no 'rejected' field"),
        ({"prompt": "p", "rejected": "a"}, "no 'chosen' field"),
        (
            {"prompt": "p", "chosen": 1, "rejected": "b"},
            "'chosen' must be a string or an assistant message, got int",
        ),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' must be a string, got NoneType"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"},
            "'margin' must be a number, got str",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": True},
            "'margin' must be a number, got bool",
        ),
        ({"chosen": "plain a", "rejected": "plain b"}, "'chosen'/'rejected' without 'prompt'"),
        ({"chosen": [USER, ASSISTANT], "rejected": "x"}, "'rejected'"),
        (
            {"chosen": HH, "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 5."},
            "'chosen' and 'rejected' do not share the same conversation",
        ),
        (
            {"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "hi"}, ASSISTANT]},
            "'chosen' and 'rejected' do not share the same conversation",
        ),
        (
            {"chosen": [USER, ASSISTANT], "rejected": [USER]},
            "last message of 'rejected' must be the assistant's",
        ),
    ],
)
def test_preference_errors_name_row_and_field(record, field):
    with pytest.raises(DataFormatError, match=f"^{LOC}: .*{field}"):
        to_preference_row(record, WHERE)


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "same", "rejected": " same\n"},
        {"prompt": "p", "responses": ["a", "b", "a"]},
        {"chosen": HH, "rejected": HH},
        {"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]},
    ],
)
def test_identical_responses_skip(record):
    with pytest.raises(SkipRow) as info:
        to_preference_row(record, WHERE)
    assert info.value.reason == "identical responses"


# -- prompts -------------------------------------------------------------------------------------


def test_prompt_rows_from_every_format_agree():
    forms = [
        {"prompt": [USER]},
        {"messages": [USER, ASSISTANT]},
        {"messages": [USER]},
        {"text": HH},
        {"chosen": HH, "rejected": HH + "!"},
        {"prompt": [USER], "completion": [ASSISTANT]},
    ]
    for record in forms:
        assert to_prompt_row(record, WHERE).prompt == [USER], record


def test_prompt_row_errors():
    with pytest.raises(DataFormatError, match=f"^{LOC}: 'messages' holds only an assistant turn"):
        to_prompt_row({"messages": [ASSISTANT]}, WHERE)
    with pytest.raises(DataFormatError, match=rf"^{LOC}: no prompt found \(has \['text'\]\)"):
        to_prompt_row({"text": "no transcript here"}, WHERE)


# -- orderings that must not be misread --------------------------------------------------------


@pytest.mark.parametrize("field", ["ranking", "rank", "order", "ratings", "rankings", "Ranking", "Ranks"])
def test_an_ordering_field_this_reader_does_not_apply_is_an_error(field):
    """A K-way row whose order lives in an unknown field would otherwise train the worst answer as the best."""
    record = {"prompt": "p", "responses": ["bad", "ok", "best"], field: [2, 1, 0]}
    with pytest.raises(
        DataFormatError, match=rf"^{LOC}: field '{field}' orders or rates the responses.*'ranks'"
    ):
        to_preference_row(record, WHERE)


@pytest.mark.parametrize("field", ["scores", "ratings", "preference"])
def test_an_ordering_field_beside_chosen_and_rejected_is_an_error(field):
    record = {"prompt": "p", "chosen": "a", "rejected": "b", field: [1, 2]}
    with pytest.raises(DataFormatError, match=rf"^{LOC}: field '{field}'.*already order the pair"):
        to_preference_row(record, WHERE)


def test_per_response_scores_order_best_first_and_ties_form_tiers():
    row = to_preference_row(
        {"prompt": "p", "responses": ["b", "a", "c", "d"], "scores": [7, 9.5, 7, 1]}, WHERE
    )
    assert row.responses == ["a", "b", "c", "d"]
    assert row.tiers == [0, 1, 1, 2]  # "b" and "c" tie: no comparison between them
    strict = to_preference_row({"prompt": "p", "responses": ["c", "a", "b"], "scores": [0.1, 3, 2]}, WHERE)
    assert strict == to_preference_row({"prompt": "p", "responses": ["a", "b", "c"]}, WHERE)
    finished = to_preference_row(
        {"prompt": "p", "responses": ["x", "y"], "scores": [1, 2], "finished": [True, False]}, WHERE
    )
    assert (finished.responses, finished.finished) == (["y", "x"], [False, True])


@pytest.mark.parametrize(
    "scores, pattern",
    [
        ([1, 2, 3], "must be a list of 2 numbers"),
        ([1, True], "must be a list of 2 numbers"),
        ("12", "must be a list of 2 numbers"),
        ([1, float("nan")], "finite numbers"),
    ],
)
def test_bad_scores_name_row_and_field(scores, pattern):
    with pytest.raises(DataFormatError, match=rf"^{LOC}: .*{pattern}"):
        to_preference_row({"prompt": "p", "responses": ["x", "y"], "scores": scores}, WHERE)


def test_ranks_and_scores_together_are_an_error_and_all_tied_scores_skip():
    with pytest.raises(DataFormatError, match=rf"^{LOC}: fields 'ranks' and 'scores'"):
        to_preference_row({"prompt": "p", "responses": ["x", "y"], "ranks": [1, 2], "scores": [2, 1]}, WHERE)
    with pytest.raises(SkipRow, match="same score"):
        to_preference_row({"prompt": "p", "responses": ["x", "y"], "scores": [4, 4]}, WHERE)
