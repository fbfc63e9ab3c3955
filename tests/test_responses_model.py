"""Responses with the real embedded model: a chain reuses its prompt state, and says so."""

from __future__ import annotations

import openai
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.model


def test_follow_up_reports_the_reused_prompt_as_cached(model_server: ServerProcess) -> None:
    client = openai.OpenAI(
        base_url=f"{model_server.url}/v1", api_key="unused", max_retries=0, timeout=120
    )
    first = client.responses.create(input="Name three colours.", max_output_tokens=16)
    second = client.responses.create(
        input="Now name three animals.", previous_response_id=first.id, max_output_tokens=16
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    cached = second.usage.input_tokens_details.cached_tokens
    # Everything the first response evaluated is still in the chain's state; the new
    # turn adds only its own tokens.
    assert first.usage.input_tokens - 2 <= cached < second.usage.input_tokens
    third = client.responses.create(
        input="And three fruits.", previous_response_id=second.id, max_output_tokens=16
    )
    assert third.usage is not None
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens - 2
    # A fork of the first response shares its prefix with the state the chain left.
    fork = client.responses.create(
        input="Now name three trees.", previous_response_id=first.id, max_output_tokens=16
    )
    assert fork.usage is not None
    assert fork.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 2
    # A conversation reuses its state the same way.
    conversation = client.conversations.create()
    client.responses.create(input="Hello there.", conversation=conversation.id)
    again = client.responses.create(input="How are you?", conversation=conversation.id)
    assert again.usage is not None and again.usage.input_tokens_details.cached_tokens > 0
