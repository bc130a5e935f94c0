"""`steppo export`: a checkpoint becomes a plain Hugging Face model (LoRA merged) that
transformers loads without StepPO, with the same outputs as the trained policy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steppo.cli import main
from steppo.config import load_config
from steppo.evaluate import _model_source
from steppo.models.build import build_models
from tests.test_cli_runs import TINY


@pytest.mark.parametrize("lora", [0, 4])
def test_export_writes_a_model_transformers_loads_with_the_policys_logits(tmp_path, lora):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", *TINY, "trainer.iterations=1", f"model.lora_rank={lora}", f"run.output_dir={run}"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not (out / "adapter_config.json").exists()  # merged: no peft needed to load it
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template

    cfg = load_config(overrides=[*TINY, f"model.lora_rank={lora}", f"run.output_dir={run}"])
    ckpt = sorted((run / "checkpoints").glob("iter_*"))[-1]
    m, base, policy_dir = _model_source(cfg, ckpt, lambda: [])
    models = build_models(m, base_path=base, with_critic=False, shared_critic=False, with_reference=False,
                          temperature=1.0, policy_dir=policy_dir)
    ids = torch.tensor([tok.encode("You go north. Treasure: 2 south.")])
    with torch.no_grad():
        want = models.policy.model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # a second export into the same directory is refused, nothing overwritten
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
