"""The sbatch script of ``keyetron launch`` (no SLURM needed): directives, environment, the
srun / torchrun command as the job's shell will split it, the forwarding of SLURM's warning
signal to the training processes, and the errors of jobs that cannot run."""
import json
import os
import select
import shlex
import signal
import stat
import subprocess

import pytest

from keyetron.cli import main
from keyetron.launch.sbatch import JobSpec, LaunchError, render_sbatch, validate
from keyetron.launch.submit import submit


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "train.jsonl").write_text("")  # read from the submit directory
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "tiny-run", "output_dir": str(tmp_path / "run"), "model": {"config": "tiny"},
                                "data": {"sources": ["data/demo/train.jsonl"]}}))
    return path


def spec(recipe, **kw):
    return JobSpec(recipe=recipe, workdir=recipe.parent, output_dir=recipe.parent / "run", job_name="tiny-run", **kw)


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def exports(script: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in script.splitlines()
                if line.startswith("export ") and "$" not in line)


def fake_bin(folder, name, body):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_PER_TASK": "4"}


def run_script(script, tmp_path, srun_body, **popen):
    """Run the batch script with a fake ``srun`` (``srun_body``) and ``scontrol`` first on PATH."""
    bin_dir = tmp_path / "bin"
    fake_bin(bin_dir, "srun", srun_body)
    fake_bin(bin_dir, "scontrol", 'echo n1; echo n2\n')
    (tmp_path / "job.sh").write_text(script)
    env = os.environ | SLURM_ENV | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path)}
    return subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_a_cpu_job_runs_its_processes_on_gloo_one_core_each(recipe):
    script = render_sbatch(spec(recipe, nodes=1, gpus_per_node=0, procs_per_node=2, tp=2))
    d = directives(script)
    logs = recipe.parent / "run" / "logs"
    assert d[:4] == ["--job-name=tiny-run", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"]
    assert {f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err", "--open-mode=append", "--requeue",
            "--signal=B:USR1@300", f"--chdir={recipe.parent}"} <= set(d)
    assert not any("gpu" in x or "gres" in x for x in d)
    env = exports(script)
    assert env["KEYETRON_DEVICE"] == "cpu" and env["GLOO_SOCKET_IFNAME"] == "lo" and env["OMP_NUM_THREADS"] == "1"
    assert not any(k.startswith("NCCL") for k in env)
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in script  # srun of SLURM 22.05 does not inherit it
    bash_n = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash_n.returncode == 0, bash_n.stderr


def test_a_gpu_job_asks_for_gpus_and_sets_nccl_up(recipe):
    script = render_sbatch(spec(recipe, nodes=4, gpus_per_node=8, tp=2, pp=2, cp=2, partition="gpu",
                                account="proj", time="4:00:00", cpus_per_task=64, warning_seconds=600,
                                sbatch_args=["--qos=high"]))
    d = directives(script)
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--time=4:00:00",
            "--partition=gpu", "--account=proj", "--signal=B:USR1@600", "--qos=high"} <= set(d)
    env = exports(script)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_DEBUG"] == "WARN" and env["OMP_NUM_THREADS"] == "8" and "KEYETRON_DEVICE" not in env
    assert "GLOO_SOCKET_IFNAME" not in env  # several nodes: the site's network, not loopback


def test_srun_starts_one_torchrun_per_node_with_the_training_command(recipe, tmp_path):
    script = render_sbatch(spec(recipe, nodes=2, gpus_per_node=4, tp=2, pp=2, overrides=["name=a b$c", "x.y=[1, 2]"],
                                torchrun="/venv/bin/torchrun"))
    proc = run_script(script, tmp_path, 'printf "%s\\n" "$@" > "$OUT/args"\n')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    args = (tmp_path / "args").read_text().splitlines()
    srun, torchrun = args[:args.index("/venv/bin/torchrun")], args[args.index("/venv/bin/torchrun"):]
    assert srun == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=4"]
    port = 20000 + 77 % 20000
    assert torchrun == ["/venv/bin/torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"n1:{port}", "--rdzv-id", "77",
                        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "300",
                        "-m", "keyetron.train", "--recipe", str(recipe), "--tp", "2", "--pp", "2", "--cp", "1",
                        "--set", "name=a b$c", "--set", "x.y=[1, 2]"]
    assert f"start 0 on n[1-2], rendezvous n1:{port}" in out


def test_the_batch_shell_forwards_the_warning_signal_and_ends_with_the_training_status(recipe, tmp_path):
    script = render_sbatch(spec(recipe, gpus_per_node=0))
    srun = ('sleep 60 & pid=$!\n'
            'trap \'echo got-USR1 > "$OUT/forwarded"; kill $pid; exit 7\' USR1\n'
            'echo ready > "$OUT/ready"\n'
            'wait\n')
    # "ready" is a FIFO: the fake srun's echo into it, once its trap is set, is the event the test waits on
    os.mkfifo(tmp_path / "ready")
    ready = os.open(tmp_path / "ready", os.O_RDONLY | os.O_NONBLOCK)
    proc = run_script(script, tmp_path, srun)
    try:
        readable, _, _ = select.select([ready], [], [], 30)
        assert readable and os.read(ready, 64) == b"ready\n", \
            f"the fake srun did not start in 30 s (status {proc.poll()})"
        proc.send_signal(signal.SIGUSR1)  # as `scancel --signal=USR1 --batch` or --signal=B:USR1@N
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(ready)
    assert (tmp_path / "forwarded").read_text() == "got-USR1\n"
    assert "SIGUSR1 received: forwarding it" in out and "training exited with status 7" in out
    assert proc.returncode == 7


@pytest.mark.parametrize("kw, message", [
    (dict(gpus_per_node=2, tp=4), r"tp x pp x cp = 4 x 1 x 1 = 4 does not divide the 2 GPUs \(1 node\(s\) x 2"),
    (dict(nodes=3, gpus_per_node=0, procs_per_node=2, tp=2, cp=2), r"= 4 does not divide the 6 CPU processes"),
    (dict(gpus_per_node=8, tp=2, dp=2), r"parallel.dp 2 x tp x pp x cp 2 = 4 is not the 8 GPUs"),
    (dict(gpus_per_node=8, procs_per_node=2), r"--procs-per-node 2 is for CPU jobs"),
    (dict(gpus_per_node=0, procs_per_node=0), r"--procs-per-node must be at least 1"),
    (dict(gpus_per_node=1, job_name="my run"), r"job name 'my run' may hold"),
])
def test_jobs_that_cannot_run_fail_before_submitting_and_say_why(recipe, kw, message):
    with pytest.raises(LaunchError, match=message):
        validate(JobSpec(recipe=recipe, workdir=recipe.parent, output_dir=recipe.parent, **kw))


def test_the_cli_names_a_missing_recipe_and_a_bad_layout(recipe, tmp_path, capsys):
    assert main(["launch", "--recipe", str(tmp_path / "nope.yaml"), "--gpus-per-node", "1", "--dry-run"]) == 2
    assert f"recipe {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err
    assert main(["launch", "--recipe", str(recipe), "--gpus-per-node", "0", "--procs-per-node", "3", "--tp", "2",
                 "--dry-run"]) == 2
    assert "= 2 does not divide the 3 CPU processes" in capsys.readouterr().err
    assert main(["launch", "--recipe", str(recipe), "--gpus-per-node", "1", "--set", "train.stepz=3",
                 "--dry-run"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_dry_run_prints_the_script_with_the_recipe_layout_and_submits_nothing(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch: nothing could be submitted
    monkeypatch.chdir(tmp_path)  # the submit directory, where the recipe's data/demo/train.jsonl is
    assert main(["launch", "--recipe", str(recipe), "--gpus-per-node", "0", "--procs-per-node", "4",
                 "--set", "parallel.cp=2", "--output-dir", str(tmp_path / "elsewhere"), "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n") and "--cp 2" in script and "--tp 1" in script
    assert f"--output={tmp_path / 'elsewhere' / 'logs'}/%x-%j.out" in script
    assert shlex.quote(f"output_dir={tmp_path / 'elsewhere'}") in script
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "run").exists()


def test_submit_writes_the_script_beside_the_logs_and_returns_the_job_id(recipe, tmp_path, monkeypatch):
    fake_bin(tmp_path / "bin", "sbatch", f'echo "$@" > {tmp_path}/sbatch.args; echo "123;cluster"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    s = spec(recipe, gpus_per_node=0)
    assert submit(s, render_sbatch(s)) == "123"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(s.log_dir / "tiny-run.sbatch")]
    assert (s.log_dir / "tiny-run.sbatch").read_text() == render_sbatch(s)


def test_submit_without_sbatch_says_where_to_run(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    s = spec(recipe, gpus_per_node=0)
    with pytest.raises(LaunchError, match="sbatch not found.*--dry-run"):
        submit(s, render_sbatch(s))


def test_a_gpu_job_asks_for_8_cpus_per_gpu_unless_told_and_says_so(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--recipe", str(recipe), "--gpus-per-node", "8", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "--cpus-per-task=64" in directives(out.out) and exports(out.out)["OMP_NUM_THREADS"] == "8"
    assert "# --cpus-per-task=64: keyetron launch's default of 8 per GPU; pass --cpus-per-task to change it" in out.out
    assert out.err == ("keyetron launch: --cpus-per-task 64 (8 per GPU, the default); pass --cpus-per-task to "
                       "change it\n")
    assert main(["launch", "--recipe", str(recipe), "--gpus-per-node", "8", "--cpus-per-task", "96", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "--cpus-per-task=96" in directives(out.out) and "default" not in out.out + out.err
    # 0: no directive at all, the site's default (OpenMP then gets one thread per process)
    script = render_sbatch(spec(recipe, gpus_per_node=8, cpus_per_task=0))
    assert not any(d.startswith("--cpus-per-task") for d in directives(script))
    assert exports(script)["OMP_NUM_THREADS"] == "1" and "$SLURM_CPUS_PER_TASK" not in script


def test_fewer_cpus_than_processes_is_refused(recipe):
    with pytest.raises(LaunchError, match=r"^--cpus-per-task 4 is fewer than the 8 training processes of a node; "
                                          r"give at least one CPU per process \(e.g. --cpus-per-task 64\)$"):
        validate(spec(recipe, gpus_per_node=8, cpus_per_task=4))


def launch_dry_run(recipe, tmp_path, capsys, monkeypatch, *flags):
    """``keyetron launch ... --dry-run`` from the recipe's folder with no sbatch anywhere: (status, stdout, stderr)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    code = main(["launch", "--recipe", str(recipe), *flags, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flags, message", [
    (["--set", "data.sources=[data/demo/trian.jsonl]"],
     "data.sources[0] data/demo/trian.jsonl does not exist (in {tmp}: relative paths are read from where the job "
     "starts); fix the path in the recipe or with --set data.sources=[...]"),
    (["--set", "data.eval=data/demo/eval.jsonl"],
     "data.eval data/demo/eval.jsonl does not exist (in {tmp}: relative paths are read from where the job starts); "
     "fix the path in the recipe or with --set data.eval=..."),
    (["--set", "model.init=ckpt/stage2"],
     "model.init ckpt/stage2 does not exist (in {tmp}: relative paths are read from where the job starts); give a "
     "Hugging Face folder, a keyetron step-N checkpoint or a `keyetron merge` output"),
    (["--set", "checkpoint.start_from={tmp}/runs/s2/checkpoints/step-000100"],
     "checkpoint.start_from {tmp}/runs/s2/checkpoints/step-000100 does not exist; give the earlier stage's step-N "
     "checkpoint folder"),
    (["--set", "model.config=tiniest"],
     "unknown model config 'tiniest': use one of ['keye-8b', 'small', 'tiny'] or a path to a YAML file"),
    (["--tp", "3"],  # on 6 GPUs the world fits; the model's 4 heads do not
     "parallel.tp=3 does not divide the attention heads: model config 'tiny' has num_heads 4, num_kv_heads 2, "
     "vocab_size 151936; choose parallel.tp from 1, 2 or 4"),
    (["--pp", "2"],
     "train.grad_accum=1 with parallel.pp=2: a pipeline of 2 stages needs at least 2 packed rows (micro-batches) "
     "per step and data-parallel rank; set train.grad_accum to 2 or more, or lower parallel.pp"),
    (["--pp", "3", "--set", "train.grad_accum=3"],
     "parallel.pp=3 pipeline stages for the 2 decoder layers of model config 'tiny' (num_layers 2): every stage "
     "needs a layer; choose pp x virtual_stages <= 2"),
])
def test_a_job_that_cannot_start_fails_in_one_line_before_anything_is_written(recipe, tmp_path, capsys,
                                                                              monkeypatch, flags, message):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    code, out, err = launch_dry_run(recipe, tmp_path, capsys, monkeypatch, "--gpus-per-node", "6", *flags)
    assert (code, out) == (2, "")
    assert err == f"keyetron launch: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "run").exists()


def test_the_preflight_reads_relative_paths_from_the_submit_directory(recipe, tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt" / "stage2").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "eval.jsonl").write_text("")
    code, out, err = launch_dry_run(recipe, tmp_path, capsys, monkeypatch, "--gpus-per-node", "0",
                                    "--set", "model.init=ckpt/stage2", "--set", "data.eval=data/demo/eval.jsonl",
                                    "--set", "checkpoint.start_from=ckpt/missing-but-resumed")
    # start_from is read only when the run has no checkpoint of its own: here it has one
    assert code == 2 and "checkpoint.start_from ckpt/missing-but-resumed does not exist" in err
    (tmp_path / "run" / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    code, out, err = launch_dry_run(recipe, tmp_path, capsys, monkeypatch, "--gpus-per-node", "0",
                                    "--set", "model.init=ckpt/stage2", "--set", "data.eval=data/demo/eval.jsonl",
                                    "--set", "checkpoint.start_from=ckpt/missing-but-resumed")
    assert (code, err) == (0, "") and out.startswith("#!/bin/bash\n")
