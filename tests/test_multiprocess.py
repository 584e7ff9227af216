"""Two processes x 2 CPU devices (jax.distributed over loopback) compute the 1-process train step."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_step.py")
REPO = SCRIPT.parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def launch(out: pathlib.Path, process_id: int, num_processes: int, port: int, devices: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(process_id), str(num_processes), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"a process did not finish:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]


def test_two_processes_of_two_devices_give_the_one_process_result(tmp_path):
    single, multi = tmp_path / "single.npz", tmp_path / "multi.npz"
    port = free_port()
    processes = [launch(multi, index, 2, port, devices=2) for index in range(2)]
    processes.append(launch(single, 0, 1, 0, devices=4))
    for process in processes:
        finish(process)

    one, two = np.load(single), np.load(multi)
    assert int(one["devices"]) == int(two["devices"]) == 4
    assert set(one.files) == set(two.files)
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The steps did something: the second step's loss differs from the first one's.
    assert not np.allclose(one["losses"][0], one["losses"][1])
