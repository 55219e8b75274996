"""Training data: read any supported file, detect its format, validate it like OpenAI, tokenize it
with the model's chat template and label masks, and cache the features.

    load_dataset(path, kind)          -> Dataset of Conversation / PreferencePair / Unpaired / Text / Labeled
    validate_file(path, method, ...)  -> ValidationReport (OpenAI-style checks, token statistics)
    encode_chat / encode_pair / encode_prompt / encode_text  -> token ids and labels
    cached_encode(dataset, tokenizer, encode_fn, settings)   -> features, tokenized once
"""

from tunery.data.cache import cached_encode
from tunery.data.encode import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    encode_chat,
    encode_completion,
    encode_pair,
    encode_prompt,
    encode_text,
)
from tunery.data.formats import load_dataset
from tunery.data.types import Conversation, Dataset, Labeled, PreferencePair, Text, Unpaired
from tunery.data.validate import ValidationReport, kind_for_method, validate_file

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "Conversation",
    "Dataset",
    "Labeled",
    "PreferencePair",
    "Text",
    "Unpaired",
    "ValidationReport",
    "cached_encode",
    "encode_chat",
    "encode_completion",
    "encode_pair",
    "encode_prompt",
    "encode_text",
    "kind_for_method",
    "load_dataset",
    "validate_file",
]
