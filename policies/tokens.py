"""Token counting with tiktoken's `o200k_base`, offline: the encoding files are the ones
litellm bundles, so counting never downloads anything."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

ENCODING_NAME = "o200k_base"  # the encoding of gpt-4o and later OpenAI models
TOKENS_PER_MESSAGE = 3  # OpenAI cookbook: <|start|>{role}\n{content}<|end|>
TOKENS_PER_NAME = 1  # OpenAI cookbook: a message's `name` costs one more token
REPLY_PRIMING_TOKENS = 3  # OpenAI cookbook: every reply is primed with <|start|>assistant
# where litellm keeps tiktoken's cache files (named by the SHA-1 of their download URL)
_LITELLM_TOKENIZER_DIR = "litellm_core_utils/tokenizers"


def _point_tiktoken_at_bundled_files() -> None:
    """Let tiktoken find its files in litellm's package, without importing litellm."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = list(spec.submodule_search_locations)[0]
    os.environ["TIKTOKEN_CACHE_DIR"] = f"{package_dir}/{_LITELLM_TOKENIZER_DIR}"


@functools.cache
def _encoding() -> tiktoken.Encoding:
    _point_tiktoken_at_bundled_files()
    import tiktoken

    encoding = tiktoken.get_encoding(ENCODING_NAME)
    # tiktoken keeps its Python dict of the 200k ranks beside the Rust copy it encodes with,
    # only to pickle the encoding (which we never do): dropping it saves ~25 MiB per process
    encoding._mergeable_ranks = {}
    return encoding


def count_text_tokens(text: str) -> int:
    """Tokens of `text`; special-token markers in it count as ordinary text."""
    return len(_encoding().encode(text, disallowed_special=()))


def encode_text(text: str) -> list[int]:
    """The token ids of `text` (special-token markers as ordinary text)."""
    return list(_encoding().encode(text, disallowed_special=()))


def decode_tokens(tokens: Sequence[int]) -> str:
    return str(_encoding().decode(list(tokens)))


def _json_tokens(value: object) -> int:
    return count_text_tokens(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _value_tokens(value: Any) -> int:
    """A message field's tokens: text as text, content parts by their text, the rest as JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return count_text_tokens(value)
    if isinstance(value, list):
        return sum(_part_tokens(part) for part in value)
    return _json_tokens(value)


def _part_tokens(part: Any) -> int:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return count_text_tokens(part["text"])
    if isinstance(part, str):
        return count_text_tokens(part)
    return _json_tokens(part)


def count_chat_prompt_tokens(messages: list[dict[str, Any]], tools: list[Any] | None = None) -> int:
    """The prompt tokens of a chat request, by the OpenAI cookbook's formula: 3 per message,
    the tokens of each value, 1 per `name`, 3 to prime the reply; tools as their JSON."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _value_tokens(value)
            if key == "name":
                total += TOKENS_PER_NAME
    if tools:
        total += _json_tokens(tools)
    return total


def count_embedding_input_tokens(input: str | list[Any]) -> int:
    """Tokens of an embeddings `input`: a string, a list of strings, a list of token ids, or a
    list of token-id lists."""
    if isinstance(input, str):
        return count_text_tokens(input)
    total = 0
    for item in input:
        if isinstance(item, str):
            total += count_text_tokens(item)
        elif isinstance(item, list):
            total += len(item)
        else:  # one token id of a single tokenised input
            total += 1
    return total
