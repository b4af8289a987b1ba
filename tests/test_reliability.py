"""What a run survives, and what the user sees: a kill, a full disk, a damaged file, a diverging run,
changed flags, a dead launcher, and the end of a multi-process run (docs/recipes.md, "What survives what").

The full-disk cases run twice: with an ``OSError(ENOSPC)`` injected into the write (everywhere), and on a
real 2 MB tmpfs mounted in a user namespace (where ``unshare -rm`` is allowed). The multi-process cases
and the SIGKILL chains are marked ``slow``; CI runs them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes import checkpoint, metrics, pretrain
from recipes.export import export_checkpoint
from recipes.health import HealthWatch
from tests.recipe_runs import SCRIPT, common, read_metrics, run_script


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp && true"],
                           capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` to mount a small tmpfs")


# ---- kill -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(corpus, tmp_path):
    args = ["--method", "sltrain", "--steps", "12", "--save-every", "4", "--eval-every", "6", "--eval-batches", "2"]
    whole = run_script(common(corpus, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_script(common(corpus, tmp_path / "killed", *args, "--kill-after-step", "10"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000008"]  # steps 9 and 10 were logged, then lost
    assert [r["step"] for r in read_metrics(tmp_path / "killed")[0]][-1] == 10
    resumed = run_script(common(corpus, tmp_path / "killed", *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    (train_a, eval_a), (train_b, eval_b) = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in train_b] == list(range(1, 13))
    assert [r["loss"] for r in train_b] == [r["loss"] for r in train_a]  # bit for bit
    assert [r["lr"] for r in train_b] == [r["lr"] for r in train_a]
    assert [(r["step"], r["val_loss"]) for r in eval_b] == [(r["step"], r["val_loss"]) for r in eval_a]


# ---- divergence, and flags changed on resume -----------------------------------------------------------


def test_a_diverging_run_stops_and_never_checkpoints_non_finite_state(corpus, tmp_path, capsys, restore_torch_globals):
    from safetensors.torch import load_file

    out = tmp_path / "diverge"
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "6", "--save-every", "1", "--lr", "1e20"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "stopped at step" in err and "nothing was saved for this step" in err and "--resume" in err
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved, "the first step's checkpoint should exist"
    for path in saved:
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path
        state = torch.load(path / "state_rank0.pt", weights_only=True)["optimizer"]
        tensors = [t for inner in state["inner"] for s in inner["state"].values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert all(torch.isfinite(t).all() for t in tensors), path
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_takes_the_new_learning_rate_and_weight_decay(corpus, tmp_path, restore_torch_globals):
    """The optimizer's saved groups used to win over the new flags, while the banner showed the new ones."""
    first = tmp_path / "first"
    pretrain.main(common(corpus, first, "--method", "lost", "--steps", "2", "--lr", "1e-3", "--weight-decay", "0"))
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    new = ("--lr", "5e-4", "--weight-decay", "0.1")
    pretrain.main(common(corpus, resumed, "--method", "lost", "--steps", "4", "--resume", "auto", *new))
    reference = tmp_path / "reference"  # the same schedule from the start: the learning rates to expect
    pretrain.main(common(corpus, reference, "--method", "lost", "--steps", "4", *new))
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "resume", "step": 2, "changed": {"lr": [1e-3, 5e-4], "weight_decay": [0.0, 0.1]}} in records
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    expected = {r["step"]: r["lr"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"}
    assert lrs[3] == pytest.approx(expected[3]) and lrs[4] == pytest.approx(expected[4])
    state = torch.load(resumed / "checkpoints" / "step_00000004" / "state_rank0.pt", weights_only=True)["optimizer"]
    decays = {group["weight_decay"] for inner in state["inner"] for group in inner["param_groups"]}
    assert decays == {0.1, 0.0}  # factors and weights decay at the new rate; norms and biases never do


def test_resume_with_other_parameter_groups_is_an_error_line(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "groups"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, "--method", "lost", "--steps", "3", "--resume", "auto", "--linear-lr-scale", "0.5"))
    assert exit_info.value.code == 2
    assert "resume with --linear-lr-scale 1" in capsys.readouterr().err


# ---- damaged files -------------------------------------------------------------------------------------


def test_a_torn_metrics_line_and_a_finished_run_resume_cleanly(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "torn"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--save-every", "1"))
    # a finished run resumed logs nothing twice
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--resume", "auto"))
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    # a line cut short (disk full, or a kill mid-write) costs that line only
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    capsys.readouterr()
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "3", "--resume", "auto"))
    assert "was cut short" in capsys.readouterr().err
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 2, 3]
    assert not (out / ".metrics.jsonl.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "empty state", "missing state"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(damage, corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "damaged"
    pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "3", "--save-every", "1", "--keep", "3"))
    newest = out / "checkpoints" / "step_00000003"
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty state":
        (newest / "state_rank0.pt").write_bytes(b"")
    else:
        (newest / "state_rank0.pt").unlink()
    capsys.readouterr()
    pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "4", "--resume", "auto", "--keep", "3",
                         "--save-every", "1"))
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is damaged" in captured.err and "weights_only=False" not in captured.err
    assert "resumed from" in captured.out and "step_00000002 at step 2" in captured.out
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())  # no temporary or half-deleted folders
    assert kept == ["step_00000002", "step_00000003", "step_00000004"]
    from recipes.checkpoint import damage

    assert all(damage(out / "checkpoints" / name) is None for name in kept)  # the damaged one was rewritten


# ---- a run that does not learn ---------------------------------------------------------------------------


def test_health_watch_says_each_sign_once_and_only_past_the_warmup():
    import math

    watch = HealthWatch(vocab_size=1000, warmup_steps=3, lr=0.5)
    uniform = math.log(1000)
    assert watch.check(2, uniform + 5, 1.0) == []  # inside the warm-up: a fresh model may sit above uniform
    assert watch.check(4, uniform + 0.9, 1.0) == []  # near uniform: a model that has not learned yet
    assert watch.check(5, uniform + 0.5, None) == []  # no gradient norm (per-layer updates): no claim
    [diverging] = watch.check(6, uniform + 1.5, 1.0)
    assert "diverging" in diverging and "--lr (now 0.5)" in diverging
    [dead] = watch.check(7, 2.0, 0.0)
    assert "gradient norm is 0" in dead
    assert watch.check(8, uniform + 9, 0.0) == []


def test_a_learning_rate_far_too_high_is_warned_about(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "hot"
    pretrain.main(common(corpus, out, "--method", "full", "--steps", "8", "--lr", "10", "--warmup", "0"))
    assert "warning: step" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in records if r["type"] == "warning"]
    assert warnings and any("diverging" in r["message"] for r in warnings)
    assert len({r["message"].split(":")[1] for r in warnings}) == len(warnings)  # each sign once

    calm = tmp_path / "calm"
    pretrain.main(common(corpus, calm, "--method", "full", "--steps", "8", "--lr", "1e-3"))
    assert not [line for line in (calm / "metrics.jsonl").read_text().splitlines() if '"warning"' in line]


# ---- a full disk -----------------------------------------------------------------------------------------


def _failing_open(fail_on: int, name_part: str):
    """``open`` whose ``fail_on``-th call for a file named like ``name_part`` (for writing) gives a file
    whose writes fail as on a full disk; every other call is the real ``open``."""
    calls = {"n": 0}

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def fake_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if name_part in str(path) and ("w" in mode or "a" in mode):
            calls["n"] += 1
            if calls["n"] == fail_on:
                return FullDisk(file)
        return file

    return fake_open


def test_a_checkpoint_on_a_full_disk_stops_the_run_and_keeps_the_last_one(corpus, tmp_path, capsys, monkeypatch,
                                                                         restore_torch_globals):
    out = tmp_path / "full"
    args = ("--method", "sltrain", "--steps", "6", "--save-every", "2", "--keep", "1")
    monkeypatch.setattr(checkpoint, "open", _failing_open(2, "state_rank"), raising=False)  # step 4's state file
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, *args))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "No space left on device" in err, err
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_00000002'}" in err
    assert "basic_ios" not in err and "unexpected pos" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # kept; no .tmp- left

    monkeypatch.undo()
    pretrain.main(common(corpus, out, *args, "--resume", "auto"))
    assert [r["step"] for r in read_metrics(out)[0]] == [1, 2, 3, 4, 5, 6]


def test_metrics_on_a_full_disk_is_an_error_line(corpus, tmp_path, capsys, monkeypatch, restore_torch_globals):
    monkeypatch.setattr(metrics, "open", _failing_open(3, "metrics.jsonl"), raising=False)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, tmp_path / "out", "--method", "lost", "--steps", "4"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: could not write" in err and "metrics.jsonl: No space left on device" in err and "Traceback" not in err


@needs_tmpfs
@pytest.mark.slow
def test_a_real_full_disk_leaves_whole_checkpoints_and_resumes_elsewhere(corpus, tmp_path):
    """The same on a 2 MB tmpfs: the real errors of torch.save and safetensors, not injected ones."""
    from recipes.checkpoint import damage

    mount, copy = tmp_path / "mount", tmp_path / "copy"
    mount.mkdir()
    args = common(corpus, mount / "run", "--method", "lost", "--steps", "8", "--save-every", "2", "--keep", "4")
    script = (f"mount -t tmpfs -o size=2m tmpfs {mount} && {sys.executable} {SCRIPT} {' '.join(map(repr, args))}; "
              f"code=$?; cp -r {mount / 'run'} {copy}; exit $code")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    saved = sorted((copy / "checkpoints").iterdir())
    assert saved and all(p.name.startswith("step_") and damage(p) is None for p in saved), saved
    resumed = run_script([*common(corpus, copy, "--method", "lost", "--steps", "8", "--save-every", "2",
                                  "--keep", "4"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(copy)[0]] == list(range(1, 9))


# ---- export ----------------------------------------------------------------------------------------------


def test_export_onto_a_file_or_a_foreign_folder_is_refused_before_training(corpus, tmp_path, capsys,
                                                                         restore_torch_globals):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for target, message in (("a-file", "is a file"), ("notes", "holds other files than an exported model")):
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main(common(corpus, tmp_path / "out", "--method", "lost", "--steps", "1",
                                 "--export", str(tmp_path / target)))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_failed_export_leaves_the_previous_one_and_a_good_one_replaces_it(corpus, tmp_path, monkeypatch,
                                                                          restore_torch_globals):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    out, target = tmp_path / "run", tmp_path / "export"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--save-every", "1", "--export", str(target)))
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    first = out / "checkpoints" / "step_00000001"

    def full_disk(self, directory, **kwargs):  # what a full disk did: an empty config.json, then an error
        (Path(directory) / "config.json").write_text("")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", full_disk)
        with pytest.raises(checkpoint.WriteFailed, match="No space left on device"):
            export_checkpoint(first, str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no staging folder left

    export_checkpoint(first, str(target))  # a good export replaces the previous one
    assert (target / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(str(target)).config.num_hidden_layers == 2


# ---- empty data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--data-files", "--valid-files"])
def test_data_files_without_text_are_an_error_line(which, corpus, tmp_path, capsys, restore_torch_globals):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n\n ")
    args = common(corpus, tmp_path / "out", "--method", "lost", "--steps", "1")
    args[args.index(which) + 1] = str(empty / "*.txt")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "its 2 file(s) hold no text" in err and which.strip("-").replace("-", "_") in err, err


# ---- multi-process: the end of a run, and a launcher that dies -------------------------------------------
WORKER = """
import os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
from recipes import distributed

mode, folder = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(1)
distributed.init("gloo", None)
rank = torch.distributed.get_rank()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
(folder / f"pid{{rank}}").write_text(str(os.getpid()))
step = 0
while mode == "forever" or step < 5:
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    step += 1
    time.sleep(0.02 if mode == "forever" else 0)
print(f"rank {{rank}} trained {{step}} steps", flush=True)
model = optimizer = None
distributed.shutdown()
"""


def _torchrun(tmp_path, mode: str) -> list[str]:
    from tests.recipe_runs import ROOT, free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(script), mode, str(tmp_path)]


@pytest.mark.slow
def test_ddp_runs_to_the_end_ten_times_without_a_hang(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(10):
        result = subprocess.run(_torchrun(tmp_path, "finish"), capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, f"attempt {attempt}: {result.stderr[-3000:]}"
        assert "rank 0 trained 5 steps" in result.stdout and "rank 1 trained 5 steps" in result.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(_torchrun(tmp_path, "forever"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid*"))) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in tmp_path.glob("pid*")]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), f"workers {workers} outlived their launcher"
    finally:
        for pid in locals().get("workers", []):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
