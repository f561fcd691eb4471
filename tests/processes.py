"""Job processes for the tests: several at once (jax.distributed on loopback), or one killed mid-job."""

import os
import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(root) -> dict[str, str]:
    """This process's environment without its fake-device and coordinator settings, with the repo importable
    and JAX on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    return env | {"PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}


def run_all(commands: list[list[str]], envs: list[dict[str, str]], *, cwd, timeout: float) -> list[str]:
    """Start every command at once, wait for all; → their combined stdout/stderr. A stuck process is killed
    (it must not outlive the test); a process that fails fails the test with the tail of its log."""
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        for command, env in zip(commands, envs, strict=True)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:] if i < len(logs) else ''}"
    return logs


def sigkill_once_written(command: list[str], output, lines: int, *, cwd, env, timeout: float) -> int:
    """Start `command` and kill it with SIGKILL once `output` holds `lines` whole lines, while it still runs
    (it must not have ended first: the kill lands mid-job) → the lines it had written."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return output.read_bytes().count(b"\n")
