"""Tool calls in-process: the checks on a request's tools and tool_choice, the schema a
constrained call follows (validated with jsonschema), and the calls parsed out of text."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from service.errors import InvalidInput
from service.generation.tools import parse_calls, plan, template_style

pytestmark = pytest.mark.unit

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_required_is_an_array_of_calls_each_valid_for_its_function():
    schema = plan([WEATHER, TIME], "required", None).schema()
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}], schema)
    jsonschema.validate(
        [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}], schema
    )
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan([WEATHER, TIME], "required", False).schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, single)


def test_a_named_function_constrains_to_its_arguments():
    p = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert p.constrained and p.schema() == WEATHER["function"]["parameters"]
    content, calls = p.calls('{"city":"Oslo"}', None)
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}


@pytest.mark.parametrize(
    ("tools", "choice", "words"),
    [
        ([WEATHER], {"type": "function", "function": {"name": "other"}}, "names no function"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "retrieval"}], "auto", "tools[0]"),
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name"),
        ([WEATHER, WEATHER], "auto", "share a name"),
        (None, "required", "no tools"),
    ],
)
def test_bad_tools_are_refused_naming_the_problem(tools, choice, words):
    with pytest.raises(InvalidInput, match=re.escape(words)):
        plan(tools, choice, None)


def test_hermes_blocks_are_parsed_and_the_rest_stays_content():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    text += '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_calls(text, "hermes", {"get_weather", "get_time"})
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"} and calls[0].id != calls[1].id


def test_text_that_is_not_a_call_of_a_known_function_stays_text():
    names = {"get_weather"}
    for text in (
        "no calls here",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        "<tool_call>not json</tool_call>",
        '{"name": "get_weather"',
    ):
        assert parse_calls(text, "hermes", names) == (text, [])
    content, calls = parse_calls(' {"name": "get_weather", "parameters": {"city": "x"}}', None, names)
    assert content is None and calls[0].name == "get_weather"  # Llama 3.1's JSON form


def test_the_template_style_is_read_from_the_template():
    assert template_style("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert template_style("{{ messages }}") is None
