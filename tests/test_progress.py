"""Progress through the real entry point: one plain line per iteration when stdout is a file,
and Ctrl-C (SIGINT) ends a run with the resume command instead of a traceback."""

import os
import signal
import subprocess
import sys
import time

from tests.test_cli_runs import TINY

FAST = [a for a in TINY if not a.startswith("run.progress")] + ["run.progress=true"]


def test_a_redirected_train_prints_one_line_per_iteration(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "steppo.cli", "train", *FAST, "trainer.iterations=3",
                               f"run.output_dir={tmp_path / 'run'}"], stdout=f, stderr=subprocess.PIPE, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("iteration ")]
    assert [line.split(" | ")[0] for line in lines] == ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    assert all("s/it" in line and "left ~" in line for line in lines)
    assert "\x1b[" not in log.read_text()  # no terminal control codes in a log


def test_ctrl_c_names_the_iteration_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    args = [sys.executable, "-m", "steppo.cli", "train", *FAST, "trainer.iterations=500", f"run.output_dir={run}"]
    with log.open("w") as f:
        # started with SIGINT ignored, as a shell script starts a background job (`cmd &`): Python then
        # installs no KeyboardInterrupt handler, and the run used to train on through the Ctrl-C
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.time() + 600
        while "iteration 1/500" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted at iteration" in err and "--resume" in err and f"run.output_dir={run}" in err
    # the checkpoints written before the interrupt are intact: the printed command resumes
    assert (run / "checkpoints").is_dir()


def test_a_ctrl_c_some_library_swallows_still_stops_at_the_next_iteration(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt caught and dropped inside an iteration (a library's broad except) does
    not leave the run going: it ends after that iteration, saved, with the resume command."""
    from steppo.cli import main
    from steppo.trainer.trainer import Trainer

    real = Trainer.train_iteration

    def iteration_that_eats_a_ctrl_c(self):
        metrics = real(self)
        if self.iteration == 2:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass  # swallowed, no trace left
        return metrics

    monkeypatch.setattr(Trainer, "train_iteration", iteration_that_eats_a_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    assert main(["train", *FAST, "trainer.iterations=6", f"run.output_dir={run}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at iteration 3 (iterations 1-2 finished" in err and "--resume" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_000001", "iter_000002"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
