"""The task instructions: the paper's by default, their languages one key each."""

from __future__ import annotations

import pytest

from datamodules.text_batches import PromptConfig
from errors import ConfigError


def test_the_default_instructions_are_the_papers():
    prompts = PromptConfig()
    assert [prompts.instruction(task) for task in prompts.prompts] == [
        "Given a Wolof query, retrieve relevant French documents",
        "Given a Wolof query, retrieve its French translation",
        "Given a Wolof query, retrieve its Wolof transcription",
    ]


def test_the_languages_are_one_key_each():
    prompts = PromptConfig(query_language="French", document_language="English")
    assert prompts.instruction(None) == "Given a French query, retrieve relevant English documents"
    assert (
        prompts.instruction("transcription_retrieval")
        == "Given a French query, retrieve its French transcription"
    )
    assert prompts.format_query("bonjour", None).endswith("English documents\nQuery:bonjour")


def test_an_instruction_with_an_unknown_field_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"prompts.prompts.document_retrieval=.*\{query_language\}"):
        PromptConfig(prompts={"document_retrieval": "Given a {language} query"})
    literal = PromptConfig(prompts={"document_retrieval": "Given {{a}} {query_language} query"})
    assert literal.instruction(None) == "Given {a} Wolof query"
