"""Chat templates as they are: Qwen3-style (drops earlier thoughts), Llama-3, Phi-3, Mistral and
ChatML, on local tokenizers built here; and one training iteration with a Qwen3-style template."""

from __future__ import annotations

import json

import pytest

from steppo.config import ConfigError, ModelConfig
from steppo.models.build import build_models, chat_template
from steppo.models.builtin import CHATML_TEMPLATE, train_tokenizer
from steppo.models.chat import ChatFormat

CORPUS = ["You stand by the well. A path leads north.", "go north", "look", "take lamp", "You see a lamp.",
          "system rules: answer with one command", "think about it first"] * 20

# Like Qwen3's: thoughts of assistant turns before the last user message are dropped.
QWEN3 = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|im_start|>system\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if empty_think is defined and empty_think %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
# Thinking switched off: the generation prompt ends with an empty think block.
QWEN3_NO_THINK = QWEN3.replace("empty_think is defined and empty_think", "true")
LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
PHI3 = (
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|system|>\\n' + m.content + '<|end|>\\n' }}"
    "{%- elif m.role == 'user' %}{{- '<|user|>\\n' + m.content + '<|end|>\\n' }}"
    "{%- else %}{{- '<|assistant|>\\n' + m.content + '<|end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)
MISTRAL = (  # no system role, no generation prompt
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m.role == 'user' %}{{- '[INST] ' + m.content + ' [/INST]' }}"
    "{%- else %}{{- m.content + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# name: (template, extra special tokens, eos, bos, end-of-turn token, whole history kept verbatim)
TEMPLATES = {
    "qwen3": (QWEN3, ["<|endoftext|>"], "<|endoftext|>", None, "<|im_end|>", False),
    "qwen3_no_think": (QWEN3_NO_THINK, ["<|endoftext|>"], "<|endoftext|>", None, "<|im_end|>", False),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>", True),
    "phi3": (PHI3, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|endoftext|>", None,
             "<|end|>", True),
    "mistral": (MISTRAL, ["<s>", "</s>"], "</s>", "<s>", "</s>", True),
    "chatml": (CHATML_TEMPLATE, [], "<|im_end|>", None, "<|im_end|>", True),
}


@pytest.fixture(scope="module")
def base_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def make_tokenizer(base, name):
    template, extra, eos, bos, _, _ = TEMPLATES[name]
    tok = base.__class__(tokenizer_object=base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str()),
                         eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    tok.chat_template = template
    return tok


SYSTEM = "system rules: answer with one command"
USERS = ["You stand by the well.", "A path leads north.", "You see a lamp."]
PLAIN = ["go north", "look", "take lamp"]
THOUGHTS = [f"<think>\nthink about it first {i}\n</think>\n\n{a}" for i, a in enumerate(PLAIN)]


def episode(chat: ChatFormat, answers: list[str]) -> tuple[list[int], list[list[int]]]:
    """A 3-turn episode as ChatFormat builds it: the ids and the prompt of each step."""
    ids = chat.initial_prompt(SYSTEM, USERS[0])
    prompts = []
    for t, answer in enumerate(answers):
        prompts.append(list(ids))
        ids = ids + chat.encode(answer) + [chat.end_of_turn_id]
        if t + 1 < len(answers):
            ids = ids + chat.observation_ids(USERS[t + 1], response_closed=True)
    return ids, prompts


def messages(answers: list[str], system: bool = True) -> list[dict]:
    out = [{"role": "system", "content": SYSTEM}] if system else []
    for user, answer in zip(USERS[: len(answers)], answers, strict=True):
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


def render_ids(tok, msgs, generation: bool) -> list[int]:
    return tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation),
                      add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_episode_ids_match_the_templates_rendering(base_tokenizer, name):
    tok = make_tokenizer(base_tokenizer, name)
    _, _, eos, _, eot, verbatim = TEMPLATES[name]
    chat = ChatFormat(tok)
    assert chat.end_of_turn_id == tok.convert_tokens_to_ids(eot) != tok.unk_token_id
    assert chat.stop_ids == {chat.end_of_turn_id, tok.convert_tokens_to_ids(eos)}
    system = name != "mistral"  # Mistral's template has no system role: it joins the first user message
    if not system:
        assert tok.decode(chat.initial_prompt(SYSTEM, USERS[0])) == f"<s>[INST] {SYSTEM}\n\n{USERS[0]} [/INST]"
    ids, prompts = episode(chat, PLAIN)
    # Every prompt is what the template renders for the conversation so far (plus its generation prompt).
    for t, prompt in enumerate(prompts):
        msgs = messages(PLAIN[:t], system) + [{"role": "user", "content": USERS[t]}]
        if not system and t == 0:
            msgs = [{"role": "user", "content": f"{SYSTEM}\n\n{USERS[0]}"}]
        elif not system:
            msgs[0]["content"] = f"{SYSTEM}\n\n{USERS[0]}"
        if verbatim or name == "qwen3":  # no thoughts: Qwen3-style keeps these turns verbatim too
            assert prompt == render_ids(tok, msgs, generation=True), t
    # The whole episode: the full rendering, up to the end-of-turn token that closes the last answer.
    full = messages(PLAIN, system)
    if not system:
        full[0]["content"] = f"{SYSTEM}\n\n{USERS[0]}"
    rendered = render_ids(tok, full, generation=False)
    if verbatim or name == "qwen3":
        assert ids == rendered[: len(ids)]
        assert ids[-1] == chat.end_of_turn_id


@pytest.mark.parametrize("name", ["qwen3", "qwen3_no_think"])
def test_qwen3_style_keeps_sampled_thoughts_and_matches_from_the_last_user_message(base_tokenizer, name):
    tok = make_tokenizer(base_tokenizer, name)
    chat = ChatFormat(tok)
    ids, prompts = episode(chat, THOUGHTS)
    text = tok.decode(ids)
    assert all(f"think about it first {i}" in text for i in range(3))  # earlier thoughts kept as sampled
    rendered = tok.decode(render_ids(tok, messages(THOUGHTS), generation=False))
    assert "think about it first 0" not in rendered and "think about it first 2" in rendered  # the template drops them
    # From the last user message on, the episode is the template's rendering token for token.
    last_user = tok.encode(f"<|im_start|>user\n{USERS[2]}", add_special_tokens=False)
    full = render_ids(tok, messages(THOUGHTS), generation=False)

    def tail(seq):
        starts = [i for i in range(len(seq)) if seq[i:i + len(last_user)] == last_user]
        return seq[starts[-1]:]

    ours, theirs = tail(ids), tail(full)
    if name == "qwen3":
        assert ours == theirs[: len(ours)] and len(theirs) == len(ours) + 1  # + the final "\n"
    else:  # the empty think block the generation prompt opened is part of the context the policy saw
        assert tok.decode(ours).startswith(f"<|im_start|>user\n{USERS[2]}<|im_end|>\n<|im_start|>assistant\n"
                                           "<think>\n\n</think>\n\n<think>")
    assert ids[: len(prompts[1])] == prompts[1] and ids[: len(prompts[2])] == prompts[2]  # append-only ids


@pytest.mark.parametrize("template, why", [
    ("{%- for m in messages %}{{- '<|im_start|>' + m.role + (loop.index0|string) + '\\n' + m.content + '<|im_end|>\\n' }}"
     "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}", "differs"),
    ("{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n' }}{%- endfor %}"
     "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}", "end-of-turn"),
    ("{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}", "assistant message"),
    ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
     "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n(re: ' + messages[-1].content + ') ' }}{%- endif %}",
     "once"),
])
def test_an_inconsistent_template_is_refused_naming_model_chat_template(base_tokenizer, template, why):
    tok = make_tokenizer(base_tokenizer, "chatml")
    tok.chat_template = template
    with pytest.raises(ConfigError, match=f"{why}.*model.chat_template=PATH"):
        ChatFormat(tok)


def test_a_tokenizer_without_a_chat_template_names_model_chat_template(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "chatml")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template.*model.chat_template"):
        ChatFormat(tok)


def test_model_chat_template_is_applied_at_load(tiny_dir, tmp_path):
    path = tmp_path / "qwen3.jinja"
    path.write_text(QWEN3_NO_THINK)
    models = build_models(ModelConfig(device="cpu", chat_template=str(path)), base_path=tiny_dir, with_critic=False,
                          shared_critic=False, with_reference=False, temperature=1.0)
    assert models.tokenizer.chat_template == QWEN3_NO_THINK
    assert models.tokenizer.decode(models.chat.initial_prompt(None, "hi")).endswith("<think>\n\n</think>\n\n")
    assert chat_template("chatml") == CHATML_TEMPLATE
    with pytest.raises(ConfigError, match="model.chat_template='nope.jinja': no such file"):
        chat_template("nope.jinja")


def test_model_options_reach_from_pretrained(tiny_dir, monkeypatch):
    from steppo.models import policy

    seen = []
    real_model, real_auto = policy.AutoModelForCausalLM.from_pretrained, policy.AutoTokenizer.from_pretrained
    real_fast = policy.PreTrainedTokenizerFast.from_pretrained
    monkeypatch.setattr(policy.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.append(("model", kw)) or real_model(path, **kw))
    monkeypatch.setattr(policy.AutoTokenizer, "from_pretrained",  # the outer call only (it calls the class's)
                        lambda path, **kw: seen.append(("tokenizer", kw)) or real_auto(path, **kw))
    monkeypatch.setattr(policy, "PreTrainedTokenizerFast", type("Fast", (), {"from_pretrained": staticmethod(
        lambda path, **kw: seen.append(("tokenizer", kw)) or real_fast(path, **kw))}))
    cfg = ModelConfig(device="cpu", revision="main", trust_remote_code=True, attn_implementation="eager")
    build_models(cfg, base_path=tiny_dir, with_critic=True, shared_critic=False, with_reference=True,
                 temperature=1.0)
    kinds = [k for k, _ in seen]
    assert kinds == ["tokenizer", "model", "model"]  # tokenizer, policy, reference (the critic copies the policy)
    assert all(kw.get("trust_remote_code") is True for _, kw in seen), seen
    assert all(kw.get("attn_implementation") == "eager" for k, kw in seen if k == "model")
    assert all("revision" not in kw for _, kw in seen)  # a local directory has no hub revision
    assert policy.load_options(cfg) == {"revision": "main", "trust_remote_code": True, "attn_implementation": "eager"}


@pytest.mark.parametrize("name", ["./modls/x", "modls/x/y"])
def test_a_mistyped_model_path_names_model_name(name, tmp_path, monkeypatch):
    from steppo.config import model_source
    from steppo.models.policy import load_tokenizer

    monkeypatch.chdir(tmp_path)
    assert model_source(name) is None
    with pytest.raises(ConfigError, match=f"model.name: '{name}' is not an existing model directory"):
        load_tokenizer(name)
    (tmp_path / "modls").mkdir()
    assert model_source("modls/x") is None  # its first folder is here: a path, not a hub id
    assert model_source("nobody/x") == "hub"


def test_a_directory_without_config_json_names_model_name(tmp_path):
    from steppo.models.build import resolve_base_model

    with pytest.raises(ConfigError, match="model.name=.*holds no config.json"):
        resolve_base_model(str(tmp_path), tmp_path, list, "small", 512, 0, None)


def test_training_with_a_qwen3_style_template_has_exact_token_parity(tmp_path):
    from steppo.cli import main

    path = tmp_path / "qwen3.jinja"
    path.write_text(QWEN3_NO_THINK)  # not append-only: a full re-rendering drops the empty think blocks
    out = tmp_path / "run"
    tiny = ["trainer.trajectories_per_iteration=4", "trainer.eval_episodes=1", "rollout.max_new_tokens=6",
            "rollout.num_envs=4", "rollout.schedule=rounds", "sft.enabled=false", "model.device=cpu",
            "run.progress=false", "trainer.micro_batch_tokens=2048", "critic.warmup_iterations=0",
            "trainer.eval_sampled=false", "trainer.eval_interval=0", "trainer.checkpoint_interval=1",
            "trainer.keep_checkpoints=3", "run.trackers=[]", "run.seed=3", "env.max_steps=4"]
    assert main(["train", *tiny, "trainer.iterations=1", f"model.chat_template={path}",
                 f"run.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    parity = [r["rollout/logprob_parity_max_abs"] for r in rows if "rollout/logprob_parity_max_abs" in r]
    assert parity and max(parity) < 1e-4
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["steps"][0]["prompt_text"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
