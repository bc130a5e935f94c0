"""`steppo view`: the per-step HTML page of a real run, and samples.jsonl storing each step's
new tokens only (issue 15, item 8)."""

import html
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest

import steppo.trainer.trainer as trainer_module
from steppo.cli import main
from steppo.view import make_server, render
from tests.test_cli_runs import TINY as FAST_RUN

# the fast run of tests/test_cli_runs.py, evaluating every iteration (later keys win)
TINY = [*FAST_RUN, "trainer.eval_interval=1", "trainer.checkpoint_interval=0", "trainer.keep_checkpoints=1",
        "env.invalid_action_penalty=-0.5"]  # rewards, so advantages and the policy move (ratios != 1)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A 2-iteration run, and the trajectories its sample records were written from."""
    out = tmp_path_factory.mktemp("view") / "run"
    seen = []
    orig = trainer_module.sample_records

    def spy(it, trajs, *args):
        seen.append((it, list(trajs)))
        return orig(it, trajs, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "sample_records", spy)
        assert main(["train", *TINY, "trainer.iterations=2", "trainer.sample_trajectories=3",
                     f"run.output_dir={out}"]) == 0
    return out, seen


def _samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_later_steps_store_only_their_new_tokens_and_reconstruct_each_prompt_exactly(real_run):
    run, seen = real_run
    records = _samples(run)
    trajs = [t for _, ts in seen for t in ts]
    assert [r["trajectory"] for r in records] == [t.id for t in trajs] and len(records) == 6
    multi = 0
    for record, traj in zip(records, trajs):
        steps = record["steps"]
        assert steps[0]["full_prompt"] is True and steps[0]["prompt_ids"] == traj.steps[0].prompt_ids
        prompt = steps[0]["prompt_ids"]
        for t in range(1, len(steps)):
            later = steps[t]
            # the cumulative context: only the observation turn appended since step t-1
            assert later["full_prompt"] is False and "prompt_ids" not in later and "prompt_text" not in later
            assert 0 < len(later["new_ids"]) < len(traj.steps[t].prompt_ids)
            prompt = prompt + steps[t - 1]["response_ids"] + later["new_ids"]
            assert prompt == traj.steps[t].prompt_ids  # exact tokens
            multi += 1
        for step, true in zip(steps, traj.steps):
            assert step["response_ids"] == true.response_ids
            assert step["ratio"] is not None and step["ratio"] > 0 and isinstance(step["clipped"], bool)
            assert step["clipped"] == (not 0.8 <= step["ratio"] <= 1.2)  # steppo's clip range
    assert multi > 0  # some trajectory had more than one step
    assert any(abs(s["ratio"] - 1) > 1e-6 for r in records for s in r["steps"])  # the second epoch moved


def test_the_page_shows_every_sampled_step_and_the_charts(real_run):
    run, _ = real_run
    page = render(run)
    records = _samples(run)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.split("<body>")[0]
    for it in (1, 2):
        assert f'id="iteration-{it}"' in page
    for r in records:
        assert html.escape(str(r["trajectory"])) in page
        for step in r["steps"]:
            assert html.escape(step["response_text"]) in page
            assert f'<td class="n reward">{step["reward"]:.3f}</td>' in page
            assert f'<td class="n value">{step["value"]:.3f}</td>' in page
            assert '<td class="n advantage' in page and f'{step["advantage"]:.3f}</td>' in page
            assert f'<td class="n ratio">{step["ratio"]:.4f}</td>' in page
            assert f'<td class="n clipped">{"yes" if step["clipped"] else "no"}</td>' in page
    assert page.count("<svg") == 3 and "polyline" in page
    assert "mean value by step index" in page and "mean advantage by step index" in page
    assert "success by iteration" in page and "held-out, greedy" in page  # eval/success of metrics.jsonl
    one = render(run, iteration=2)
    assert "mean value by step index (iteration 2)" in one


def test_html_special_characters_in_observations_are_escaped(real_run, tmp_path):
    run, _ = real_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    records = _samples(copy)
    nasty = "<script>alert('x')</script> & \"quoted\" <b>bold</b>"
    records[0]["steps"][0]["observation"] = nasty
    records[0]["steps"][0]["response_text"] = "go <north> & dig"
    (copy / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = render(copy)
    assert html.escape(nasty) in page and "go &lt;north&gt; &amp; dig" in page
    assert "<script" not in page and "<b>bold" not in page


def test_the_view_command_writes_the_page_without_loading_torch(real_run, tmp_path):
    run, _ = real_run
    out = tmp_path / "page.html"
    code = ("import sys; from steppo.cli import main; rc = main(['view', sys.argv[1], '--out', sys.argv[2]]); "
            "assert rc == 0, rc; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code, str(run), str(out)], check=True, env=env, timeout=120)
    assert out.read_bytes().decode("utf-8") == render(run)
    assert main(["view", str(tmp_path / "nothing")]) == 2
    assert main(["view", str(run), "--iteration", "7", "--out", str(out)]) == 2


def test_serve_answers_with_the_page(real_run):
    run, _ = real_run
    page = render(run)
    server = make_server(page, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/", timeout=30) as reply:
            assert reply.read().decode("utf-8") == page
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_a_headless_browser_renders_the_page(real_run, tmp_path):
    run, _ = real_run
    page, shot = tmp_path / "view.html", tmp_path / "view.png"
    page.write_text(render(run))
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,1800", page.as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.exists() and shot.stat().st_size > 10_000
