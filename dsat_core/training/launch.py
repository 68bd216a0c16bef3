"""Build and run the multi-process launch command of training (the Prefect flow calls these)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Literal

DEFAULT_SCRIPT = "dsat_core.training.train_diffusionsat"


def visible_gpu_count() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def build_launch_command(
    script_module: str,
    config_path: str,
    *,
    nproc_per_node: int | Literal["auto"] = "auto",
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    launcher: Literal["torchrun", "accelerate"] = "torchrun",
    mixed_precision: str | None = None,
    python: str | None = None,
) -> list[str]:
    """argv that launches `python -m <script_module> --config <config_path>` on `nproc_per_node` processes.

    `nproc_per_node="auto"` is the number of visible CUDA GPUs, or 1 on CPU. One node with one process
    needs no launcher. Several nodes need `rdzv_endpoint` ("host:port" of node 0). With accelerate, a
    multi-process run uses `--multi_gpu` (accelerate's MULTI_CPU config silently runs one process; on CPU
    prefer torchrun, which uses gloo).
    """
    python = python or sys.executable
    nproc = max(1, visible_gpu_count()) if nproc_per_node == "auto" else int(nproc_per_node)
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(
            f"bad launch topology: nproc_per_node={nproc}, nnodes={nnodes}, node_rank={node_rank}"
        )
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError("nnodes > 1 needs rdzv_endpoint='host:port' of the rendezvous (node 0)")
    script_args = ["--config", str(config_path)]
    if launcher == "torchrun":
        if nproc == 1 and nnodes == 1:
            return [python, "-m", script_module, *script_args]
        cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
        if nnodes == 1 and not rdzv_endpoint:
            cmd.append("--standalone")
        else:
            cmd += [
                f"--node_rank={node_rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv_endpoint}",
                "--rdzv_id=dsat-train",
            ]
        return [*cmd, "-m", script_module, *script_args]
    if launcher == "accelerate":
        cmd = [
            python,
            "-m",
            "accelerate.commands.launch",
            f"--num_processes={nproc * nnodes}",
            f"--num_machines={nnodes}",
            f"--machine_rank={node_rank}",
            "--dynamo_backend=no",
        ]
        if nproc * nnodes > 1:
            cmd.append("--multi_gpu")
        if mixed_precision:
            cmd.append(f"--mixed_precision={mixed_precision}")
        if rdzv_endpoint:
            host, _, port = rdzv_endpoint.rpartition(":")
            cmd += [f"--main_process_ip={host}", f"--main_process_port={port}"]
        return [*cmd, "-m", script_module, *script_args]
    raise ValueError(f"unknown launcher {launcher!r}; use 'torchrun' or 'accelerate'")


def run_training_subprocess(
    cmd: list[str],
    log_callback: Callable[[str], None] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> int:
    """Run `cmd`, streaming each stdout/stderr line (no newline) to `log_callback`; return the exit code."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=full_env, cwd=cwd
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if log_callback is not None:
                log_callback(line.rstrip("\n"))
        return proc.wait()
