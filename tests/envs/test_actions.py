import pytest

from steppo.envs.actions import MalformedAction, ToolCall, parse_command, parse_tool_call, tool_call_text

TOOLS = {"search": {"parameters": {"required": ["query"]}}, "answer": {"parameters": {"required": ["text"]}}}


def test_well_formed_tool_call_round_trips():
    text = "I should look it up.\n" + tool_call_text("search", query="Ada Lovelace")
    assert parse_tool_call(text, TOOLS) == ToolCall("search", {"query": "Ada Lovelace"})


def test_arguments_given_as_a_json_string_are_accepted():
    text = '<tool_call>{"name": "answer", "arguments": "{\\"text\\": \\"Paris\\"}"}</tool_call>'
    assert parse_tool_call(text, TOOLS) == ToolCall("answer", {"text": "Paris"})


@pytest.mark.parametrize(
    "text, reason",
    [
        ("just words", "no <tool_call>"),
        ('<tool_call>{"name": "search", "arguments": {"query": "x"}}', "not closed"),
        ("<tool_call>{name: search}</tool_call>", "not valid JSON"),
        ('<tool_call>["search"]</tool_call>', 'string "name"'),
        ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', "JSON object"),
        ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', "unknown tool"),
        ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "missing required arguments: query"),
        ('<tool_call>{"name": "answer", "arguments": "not json"}</tool_call>', "string that is not valid JSON"),
    ],
)
def test_malformed_tool_calls_are_typed_outcomes(text, reason):
    out = parse_tool_call(text, TOOLS)
    assert isinstance(out, MalformedAction)
    assert reason in out.reason


def test_plain_commands_take_the_action_line():
    assert parse_command("go north") == "go north"
    assert parse_command("Think: the key is east.\nAction: Go East.") == "go east"
    assert parse_command("thinking...\n\ntake key\n") == "take key"
    assert isinstance(parse_command("   \n "), MalformedAction)
