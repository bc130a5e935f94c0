"""Tools the model's own way: schemas through ``apply_chat_template(tools=...)``, tool results as
``tool`` turns, and tool calls parsed in the template's syntax. The templates are written here and
behave like Qwen2.5/Qwen3's (Hermes ``<tool_call>``), Llama 3.1's (bare JSON, ``ipython`` turns)
and Mistral v3's (``[TOOL_CALLS]``, tools before the last user message)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steppo.config import ConfigError
from steppo.envs.actions import (
    TOOL_SYNTAXES,
    MalformedAction,
    ToolCall,
    openai_tools,
    parse_tool_call,
    render_tool_call,
)
from steppo.envs.base import EnvSettings
from steppo.envs.searchqa import TOOLS, SearchQAEnv
from steppo.models.chat import ChatFormat
from tests.models.test_chat_templates import CORPUS, make_tokenizer

QWEN_TOOLS = (  # Qwen2.5-style: tools in the system turn, <tool_call> blocks, tool results as <tool_response>
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}{%- if m.content %}{{- '\\n' + m.content }}"
    "{%- endif %}{%- for c in m.tool_calls %}{{- '\\n<tool_call>\\n{\"name\": \"' + c.function.name + "
    "'\", \"arguments\": ' + (c.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA_TOOLS = (  # Llama 3.1-style: tools in the first user turn, JSON calls, results as ipython turns (tojson)
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools %}{{- 'Environment: ipython\\n' }}"
    "{%- endif %}{{- system + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{%- if loop.first and tools and m.role == 'user' %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON "
    "for a function call.\\n\\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}{{- m.content | trim + '<|eot_id|>' }}"
    "{%- elif m.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if m.content is mapping or m.content is iterable %}{{- m.content | tojson }}{%- else %}{{- m.content }}"
    "{%- endif %}{{- '<|eot_id|>' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{%- set c = m.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + c.name + '\", \"parameters\": ' + "
    "(c.arguments | tojson) + '}<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL_TOOLS = (  # Mistral v3-style: [AVAILABLE_TOOLS] right before the last user message
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if tools and loop.last %}{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST] ' + m.content + '[/INST]' }}"
    "{%- elif m.role == 'assistant' %}{{- m.content + eos_token }}"
    "{%- elif m.role == 'tool' %}{{- '[TOOL_RESULTS] ' + m.content + '[/TOOL_RESULTS]' }}{%- endif %}"
    "{%- endfor %}"
)
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|python_tag|>"]


@pytest.fixture(scope="module")
def base():
    from steppo.models.builtin import train_tokenizer

    return train_tokenizer(CORPUS + [json.dumps(TOOLS), "<tool_call> </tool_call> search answer query"], vocab_size=500)


def tokenizer(base, name):
    if name == "qwen":
        tok = make_tokenizer(base, "qwen3")
        tok.chat_template = QWEN_TOOLS
    elif name == "llama":
        tok = make_tokenizer(base, "llama3")
        tok.add_special_tokens({"additional_special_tokens": LLAMA_SPECIAL})
        tok.chat_template = LLAMA_TOOLS
    else:
        tok = make_tokenizer(base, "mistral")
        tok.add_special_tokens({"additional_special_tokens": ["<s>", "</s>", "[TOOL_CALLS]"]})
        tok.chat_template = MISTRAL_TOOLS
    return tok


SCHEMAS = openai_tools(TOOLS)
SYSTEM = "Answer the question with the search tool."


def render(tok, messages, generation=True, tools=SCHEMAS):
    return tok.encode(tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                              add_generation_prompt=generation), add_special_tokens=False)


@pytest.mark.parametrize("name, native, syntax, tool_role", [
    ("qwen", True, "hermes", True), ("llama", True, "llama3_json", True), ("mistral", False, "mistral", False)])
def test_the_template_decides_where_tools_go_and_how_calls_are_written(base, name, native, syntax, tool_role):
    chat = ChatFormat(tokenizer(base, name))
    assert (chat.native_tools, chat.tool_syntax, chat.tool_role) == (native, syntax, tool_role)


def test_a_template_without_tools_gets_them_in_the_system_prompt(base):
    chat = ChatFormat(make_tokenizer(base, "chatml"))
    assert (chat.native_tools, chat.tool_syntax, chat.tool_role) == (False, "hermes", False)
    with pytest.raises(ConfigError, match="model.native_tools=true, but this chat template does not render"):
        ChatFormat(make_tokenizer(base, "chatml"), native_tools=True)


def test_explicit_settings_win_and_an_unknown_syntax_is_named(base):
    chat = ChatFormat(tokenizer(base, "qwen"), tool_format="llama3_json", native_tools=False)
    assert (chat.native_tools, chat.tool_syntax, chat.tool_role) == (False, "llama3_json", False)
    with pytest.raises(ConfigError, match="a new user turn renders differently"):
        ChatFormat(tokenizer(base, "mistral"), native_tools=True)
    odd = make_tokenizer(base, "chatml")
    odd.chat_template = QWEN_TOOLS.replace("tool_call", "fn_call")  # presents tools, in a syntax nobody knows
    with pytest.raises(ConfigError, match="cannot tell which tool-call syntax.*model.tool_format"):
        ChatFormat(odd)
    assert ChatFormat(odd, tool_format="hermes").native_tools
    with pytest.raises(ConfigError, match="model.tool_format='xml'"):
        ChatFormat(odd, tool_format="xml")


def _native_env(chat):
    return SearchQAEnv(EnvSettings(max_steps=4, tool_syntax=chat.tool_syntax, native_tools=chat.native_tools),
                       source="synthetic", num_tasks={"train": 4, "dev": 2, "test": 2})


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_an_episode_is_the_templates_own_rendering_with_tools_and_tool_turns(base, name):
    """Prompt of step 0 = the template's rendering with the tool list; after a tool call, the
    result is the template's tool turn; the ids equal the full rendering, token for token."""
    tok = tokenizer(base, name)
    chat = ChatFormat(tok)
    env = _native_env(chat)
    assert "Tools:" not in env.instructions() and "<tool_call>{" not in env.instructions()  # not pasted twice
    assert env.chat_tools() == SCHEMAS
    task = env.tasks("train")[0]
    question, _ = env.reset(task)
    ids = chat.initial_prompt(env.instructions(), question, env.chat_tools())
    messages = [{"role": "system", "content": env.instructions()}, {"role": "user", "content": question}]
    assert ids == render(tok, messages)
    assert "steppo" not in tok.decode(ids) and '"name": "search"' in tok.decode(ids)
    for action in env.expert_actions(task)[:-1]:  # the searches: each answered as a tool turn
        result = env.step(action)
        assert not result.info.get("invalid_action"), result.observation
        ids = ids + chat.encode(action) + [chat.end_of_turn_id] + chat.observation_ids(result.observation, True, True)
        messages += [{"role": "assistant", "content": action}, {"role": "tool", "content": result.observation}]
        assert ids == render(tok, messages)
    text = tok.decode(ids)
    assert ("<tool_response>" in text) if name == "qwen" else ("<|start_header_id|>ipython" in text)


def test_a_malformed_call_is_answered_as_a_user_turn(base):
    tok = tokenizer(base, "qwen")
    chat = ChatFormat(tok)
    tool_turn = tok.decode(chat.observation_ids("oops", True, tool_result=True))
    user_turn = tok.decode(chat.observation_ids("oops", True, tool_result=False))
    assert "<tool_response>" in tool_turn and "<tool_response>" not in user_turn and "user\noops" in user_turn


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_expert_calls_are_written_as_the_template_writes_an_assistant_tool_call(base, name):
    tok = tokenizer(base, name)
    chat = ChatFormat(tok)
    env = _native_env(chat)
    task = env.tasks("train")[0]
    action = env.expert_actions(task)[0]
    call = parse_tool_call(action, TOOLS, chat.tool_syntax)
    assert isinstance(call, ToolCall)
    tool_calls = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]
    head = [{"role": "user", "content": "q"}]
    with_call = tok.apply_chat_template(head + [{"role": "assistant", "content": "", "tool_calls": tool_calls}],
                                        tools=SCHEMAS, tokenize=False)
    assert action in with_call  # the demonstration is what the model's own template writes


def test_mistral_keeps_its_call_marker_through_decoding(base):
    tok = tokenizer(base, "mistral")
    chat = ChatFormat(tok)
    env = SearchQAEnv(EnvSettings(max_steps=4, tool_syntax=chat.tool_syntax, native_tools=chat.native_tools),
                      source="synthetic", num_tasks={"train": 2, "dev": 1, "test": 1})
    assert env.chat_tools() is None and "[TOOL_CALLS] [{" in env.instructions() and "Tools: {" in env.instructions()
    action = env.expert_actions(env.tasks("train")[0])[0]
    ids = chat.encode(action)
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") in ids
    assert "[TOOL_CALLS]" not in tok.decode(ids, skip_special_tokens=True)  # a plain decode would lose it
    assert isinstance(parse_tool_call(chat.decode(ids), TOOLS, "mistral"), ToolCall)


@pytest.mark.parametrize("text, syntax, call", [
    ('I will look.\n<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>', "hermes",
     ToolCall("search", {"query": "x"})),
    ('Thought: search first. {"name": "search", "parameters": {"query": "x y"}}', "llama3_json",
     ToolCall("search", {"query": "x y"})),
    ('<|python_tag|>{"name": "answer", "arguments": {"text": "Paris"}}', "llama3_json", ToolCall("answer", {"text": "Paris"})),
    ('{"note": 1} then {"name": "answer", "parameters": "{\\"text\\": \\"Rome\\"}"}', "llama3_json",
     ToolCall("answer", {"text": "Rome"})),
    ('[TOOL_CALLS] [{"name": "search", "arguments": {"query": "x"}}]', "mistral", ToolCall("search", {"query": "x"})),
    ('[TOOL_CALLS]answer[ARGS]{"text": "Oslo"}', "mistral", ToolCall("answer", {"text": "Oslo"})),
])
def test_each_syntax_reads_the_first_call_after_free_text(text, syntax, call):
    assert parse_tool_call(text, TOOLS, syntax) == call


@pytest.mark.parametrize("text, syntax, reason", [
    ("no call here", "llama3_json", "no tool call"),
    ('{"name": "search", "parameters": {"query": "x"', "llama3_json", "no tool call"),
    ('{"name": "fly", "parameters": {}}', "llama3_json", "unknown tool 'fly'"),
    ('{"name": "search", "parameters": {}}', "llama3_json", "missing required arguments: query"),
    ('search("x")', "mistral", "no [TOOL_CALLS]"),
    ("[TOOL_CALLS] []", "mistral", "list is empty"),
    ('[TOOL_CALLS] [{"name": "search", "arguments": {"query": ', "mistral", "not valid JSON"),
    ("[TOOL_CALLS] " + "[" * 5000, "mistral", "nested too deeply"),
    ('{"a": ' * 5000, "llama3_json", "nested too deeply"),
])
def test_malformed_calls_in_every_syntax_are_typed_outcomes(text, syntax, reason):
    out = parse_tool_call(text, TOOLS, syntax)
    assert isinstance(out, MalformedAction) and reason in out.reason, out


def test_an_unknown_syntax_is_an_error_not_a_malformed_action():
    with pytest.raises(ValueError, match="unknown tool-call syntax 'xml'"):
        parse_tool_call("<call/>", TOOLS, "xml")


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_args = st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(_text, st.integers(), st.booleans()), max_size=3)


@given(st.sampled_from(TOOL_SYNTAXES), st.booleans(), st.text(st.characters(min_codepoint=97, max_codepoint=122),
                                                             min_size=1, max_size=10), _args, _text)
def test_parsing_what_a_syntax_renders_gives_the_call_back(syntax, native, name, arguments, thought):
    call = ToolCall(name, arguments)
    text = render_tool_call(call, syntax, native)
    assert parse_tool_call(text, None, syntax) == call
    if "{" not in thought and "[TOOL_CALLS]" not in thought and "<tool_call>" not in thought:
        assert parse_tool_call(thought + "\n" + text, None, syntax) == call  # after a free-text thought


def test_training_with_native_tools_has_exact_token_parity(tmp_path):
    """SFT on expert calls written the template's way, then an RL iteration on searchqa: the
    tools sit in the template's system turn, results come back as <tool_response> turns, and the
    training forward pass reproduces the sampled logprobs."""
    from steppo.cli import main
    from tests.test_cli_runs import TINY

    path = tmp_path / "qwen_tools.jinja"
    path.write_text(QWEN_TOOLS)
    out = tmp_path / "run"
    overrides = [a for a in TINY if not a.startswith(("sft.", "rollout.max_new_tokens"))]
    assert main(["train", *overrides, "env.name=searchqa", "env.params={source: synthetic, num_tasks: {train: 40, "
                 "dev: 4, test: 4}}", "sft.enabled=true", "sft.demos=16", "sft.epochs=1", "rollout.max_new_tokens=24",
                 "trainer.iterations=1", f"model.chat_template={path}", f"run.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    parity = [r["rollout/logprob_parity_max_abs"] for r in rows if "rollout/logprob_parity_max_abs" in r]
    assert parity and max(parity) < 1e-4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    first = samples[0]["steps"][0]["prompt_text"]
    assert "# Tools" in first and '"name": "search"' in first and "Tools: {" not in first
    later = [s["new_text"] for r in samples for s in r["steps"][1:] if not s["full_prompt"]]
    assert any("<tool_response>" in t for t in later) or all("Invalid action" in t for t in later)
