"""SLURM front door: the sbatch scripts parse, print exactly the launch line of the plain
script's flags (fake SLURM environment, stub srun/scontrol/torchrun: nothing is submitted),
and requeue themselves after checkpointing when the time limit nears."""

import os
import shlex
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = ["examples/slurm/llama3_8b.sbatch", "examples/slurm/llama3_70b.sbatch"]
PLAIN = {"examples/slurm/llama3_8b.sbatch": "examples/run_llama3_8b_packed.sh",
         "examples/slurm/llama3_70b.sbatch": "examples/run_llama3_70b_packed.sh"}


@pytest.mark.parametrize("script", SBATCH + ["examples/lib/slurm_launch.sh", "examples/slurm/task_env.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


@pytest.fixture
def stubs(tmp_path):
    """scontrol/srun/torchrun stand-ins on PATH that record how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"

    def stub(name, body):
        p = bin_dir / name
        p.write_text("#!/usr/bin/env bash\n" + body)
        p.chmod(0o755)

    stub("scontrol", f'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a01\\ngpu-a02\\ngpu-a03\\ngpu-a04\\n"; '
                     f'else echo "scontrol $*" >> {log}; fi\n')
    stub("torchrun", 'printf "%s\\n" "$@"\n')  # the plain script's launcher: print the flags
    # srun: record the call, then run until SIGTERM, which it answers like checkpointing ranks (exit 0)
    stub("srun", f'echo "srun $*" >> {log}; trap \'echo "srun got TERM" >> {log}; exit 0\' TERM; '
                 f'while true; do sleep 0.05; done\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "4",
           "SLURM_JOB_NODELIST": "gpu-a[01-04]", "SLURM_SUBMIT_DIR": ROOT, "DATA_PATH": "/data/sft/mix",
           "TOKENIZER": "/models/llama3", "PACK_MODE": "bfd"}
    for k in ("DRY_RUN", "MASTER_ADDR", "MASTER_PORT", "NNODES", "LAUNCHER", "SLURM_JOB_NUM_NODES", "GPUS_PER_NODE"):
        env.pop(k, None)
    return env, log


def _printed_line(script, env, *extra):
    out = subprocess.run(["bash", script, *extra], cwd="/", env={**env, "PRINT_ONLY": "1"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "job 4242" in lines[0] and "4 nodes x 8 GPUs, master gpu-a01:24242" in lines[0]
    return shlex.split(lines[-1])


def _plain_flags(script, env, *extra):
    plain_env = {**env, "NNODES": "4", "MASTER_ADDR": "gpu-a01", "MASTER_PORT": "24242"}
    out = subprocess.run(["bash", PLAIN[script], *extra], cwd=ROOT, env=plain_env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    return args[:args.index("megatron_pack.train") - 1], args[args.index("megatron_pack.train") + 1:]


@pytest.mark.parametrize("script", SBATCH)
def test_srun_line_runs_the_plain_scripts_flags(script, stubs):
    env, _ = stubs
    line = _printed_line(os.path.join(ROOT, script), env, "--eval-interval", "100")
    assert line[:line.index("examples/slurm/task_env.sh")] == [
        "srun", "--nodes", "4", "--ntasks-per-node", "8", "--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert line[line.index("examples/slurm/task_env.sh") + 1:line.index("megatron_pack.train") + 1] == [
        "python3", "-m", "megatron_pack.train"]
    flags = line[line.index("megatron_pack.train") + 1:]
    torchrun_args, plain = _plain_flags(script, env, "--eval-interval", "100")
    assert flags == plain  # the same flags, in the same order, extra flags passed through
    assert torchrun_args[:4] == ["--nproc-per-node", "8", "--nnodes", "4"]
    # requeue-friendly: it resumes from where it saves
    assert flags[flags.index("--load") + 1] == flags[flags.index("--save") + 1] == "checkpoints/" + \
        ("llama3-8b" if "8b" in script else "llama3-70b") + "_bfd"
    assert flags[flags.index("--data-path") + 1] == "/data/sft/mix" and flags[-2:] == ["--eval-interval", "100"]
    # negative control: another knob changes both sides, so the comparison can fail
    other = _printed_line(os.path.join(ROOT, script), {**env, "PACK_MODE": "greedy"}, "--eval-interval", "100")
    assert other[other.index("megatron_pack.train") + 1:] != plain


def test_check_isolation_knob_reaches_both_launchers(stubs):
    """CHECK_ISOLATION=1 adds --check-isolation error to the srun and the torchrun line alike
    (never to the planner's DRY_RUN, which has no such flag); 0, the default, adds nothing."""
    env, _ = stubs
    script = SBATCH[0]
    for knob, want in (("1", ["--check-isolation", "error"]), ("only", ["--check-isolation", "only"]), ("0", [])):
        line = _printed_line(os.path.join(ROOT, script), {**env, "CHECK_ISOLATION": knob})
        _, plain = _plain_flags(script, {**env, "CHECK_ISOLATION": knob})
        flags = line[line.index("megatron_pack.train") + 1:]
        assert flags == plain
        got = flags[flags.index("--check-isolation"):flags.index("--check-isolation") + 2] \
            if "--check-isolation" in flags else []
        assert got == want, (knob, flags)


def test_blend_in_data_path_reaches_both_launchers(stubs):
    env, _ = stubs
    env = {**env, "DATA_PATH": "0.7 /data/a 0.3 /data/b"}
    line = _printed_line(os.path.join(ROOT, SBATCH[0]), env)
    flags = line[line.index("megatron_pack.train") + 1:]
    i = flags.index("--data-path")
    assert flags[i:i + 5] == ["--data-path", "0.7", "/data/a", "0.3", "/data/b"]
    assert flags == _plain_flags(SBATCH[0], env)[1]


def test_torchrun_launcher_uses_the_allocation(stubs):
    env, _ = stubs
    line = _printed_line(os.path.join(ROOT, SBATCH[0]), {**env, "LAUNCHER": "torchrun"})
    head = line[:line.index("megatron_pack.train") + 1]
    assert head == ["srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--cpu-bind=none",
                    "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu-a01:24242", "--rdzv-id", "4242", "-m", "megatron_pack.train"]
    _, plain = _plain_flags(SBATCH[0], env)
    assert line[len(head):] == plain


def test_outside_an_allocation_says_so(stubs):
    env, _ = stubs
    env.pop("SLURM_NNODES")
    out = subprocess.run(["bash", os.path.join(ROOT, SBATCH[0])], cwd="/", env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not inside a SLURM allocation" in out.stderr


def test_task_env_maps_slurm_to_torchrun_variables():
    env = {**os.environ, "SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "8"}
    out = subprocess.run([os.path.join(ROOT, "examples/slurm/task_env.sh"), "bash", "-c",
                          'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $NODE_RANK"'],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["13", "32", "5", "8", "1"]


def test_time_limit_checkpoints_then_requeues(stubs):
    """USR1 (--signal=B:USR1@900) -> SIGTERM to srun (the ranks save and exit 0) -> scontrol requeue."""
    env, log = stubs
    proc = subprocess.Popen(["bash", os.path.join(ROOT, SBATCH[0])], cwd="/", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and "srun --nodes 4" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    assert calls[1:] == ["srun got TERM", "scontrol requeue 4242"]
    assert "time limit near, checkpointing then requeueing" in out


def test_no_requeue_when_the_run_ends(stubs, tmp_path):
    env, log = stubs
    (tmp_path / "bin" / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {log}; exit 0\n')
    out = subprocess.run(["bash", os.path.join(ROOT, SBATCH[0])], cwd="/", env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "scontrol requeue" not in log.read_text()
