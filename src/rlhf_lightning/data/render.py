"""Canonical rows to token ids: the one place where prompts meet the chat template.

A message-list prompt is rendered with the tokenizer's chat template and its generation prompt; a
string prompt is used verbatim. A completion is the text the template puts after the prompt for the
assistant's turn, cut right after its end-of-turn token, so SFT targets, reward-model inputs and PPO
responses all end the same way: with EOS, as a sampled response does.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf_lightning.data.formats import Prompt


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (templates add their own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The prompt as the model sees it, up to where the response starts."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def user_text(prompt: Prompt) -> str:
    """What the user asked: a string prompt itself, or the content of a message list's last turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def decode_response(tokenizer: PreTrainedTokenizerBase, tokens, mask) -> tuple[str, bool, int]:
    """A sampled response row as ``(text, finished, length)``: the masked-in tokens decoded without
    special tokens, whether they include EOS, and how many there are."""
    ids = tokens[mask.bool()].tolist()
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), tokenizer.eos_token_id in ids, len(ids)


def completion_text(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, finished: bool = True
) -> str:
    """The response as the model must produce it, ending with EOS (without it when not ``finished``)."""
    eos = tokenizer.eos_token if finished else ""
    if isinstance(prompt, str) or not finished:
        return completion + eos
    rendered_prompt = prompt_text(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], add_generation_prompt=False, tokenize=False
    )
    if not full.startswith(rendered_prompt):
        # A template that rewrites earlier turns: fall back to the plain continuation.
        return completion + eos
    text = full[len(rendered_prompt) :]
    end = text.rfind(eos)
    return text[: end + len(eos)] if end >= 0 else text + eos


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, finished: bool = True
) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids, encoded separately so the boundary is exact."""
    return (
        encode(tokenizer, prompt_text(tokenizer, prompt)),
        encode(tokenizer, completion_text(tokenizer, prompt, completion, finished)),
    )
