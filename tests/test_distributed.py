"""hopkit HOPs under torch.distributed: FSDP2, DDP, DTensor, tensor parallelism.

Two ranks on the gloo backend, address 127.0.0.1 only, a free port picked
here, run as two fresh processes (tests/distributed_cases.py) once for the
whole module under a hard time limit; the processes are killed, whatever
happens, when the fixture ends. Each case is then one test reading its
result, so a failure names the case and shows the rank's traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORLD = 2
TIME_LIMIT_S = 240
CASES = [
    "fsdp2", "fsdp2:aot_eager", "fsdp2:inductor",
    "ddp:aot_eager", "ddp:inductor",
    "dtensor", "dtensor:aot_eager", "dtensor:inductor",
    "tensor_parallel", "tensor_parallel:aot_eager", "tensor_parallel:inductor",
]
HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    out = tmp_path_factory.mktemp("dist") / "results.json"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "distributed_cases.py"), str(out), *CASES],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: killed whole below
        )
        for r in range(WORLD)
    ]
    logs: list[str] = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIME_LIMIT_S)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"the distributed ranks ran past {TIME_LIMIT_S} s and were killed")
        merged: dict[str, str] = {}
        for r in range(WORLD):
            path = pathlib.Path(f"{out}.{r}")
            if not path.exists():
                pytest.fail(f"rank {r} wrote no results (exit {procs[r].returncode}):\n{logs[r][-4000:]}")
            for case, res in json.loads(path.read_text()).items():
                if res != "ok":
                    merged[case] = f"rank {r}:\n{res}"
                else:
                    merged.setdefault(case, "ok")
        yield merged
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("case", CASES)
def test_distributed(results: dict[str, str], case: str) -> None:
    res = results.get(case, "not run")
    if res != "ok":
        pytest.fail(f"{case} failed\n{res}", pytrace=False)
