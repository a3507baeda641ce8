"""Detectron2's ``launch``: one process per device, NCCL on GPUs, gloo on CPU, several machines by URL."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DEFAULT_TIMEOUT", "launch"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on this machine (``num_machines`` in all).

    With a world size of 1 the function is called in this process. "GPUs" is Detectron2's word; on a machine
    without CUDA the processes run on the CPU and talk over gloo.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size > 1:
        if dist_url == "auto":
            assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        if num_machines > 1 and dist_url.startswith("file://"):
            logging.getLogger(__name__).warning("file:// is not a reliable init_method in multi-machine jobs.")
        mp.start_processes(
            _distributed_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
            daemon=False,
        )
    else:
        main_func(*args)


def _distributed_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Tuple,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    from uda_plugins.d2 import comm  # the active backend's comm (this launch serves both backends)

    has_gpu = torch.cuda.is_available()
    if has_gpu:
        assert num_gpus_per_machine <= torch.cuda.device_count()
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="NCCL" if has_gpu else "GLOO",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception as e:
        logging.getLogger(__name__).error("Process group URL: {}".format(dist_url))
        raise e
    comm.create_local_process_group(num_gpus_per_machine)
    if has_gpu:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)
    shutdown_process_groups(comm)


def shutdown_process_groups(comm_module) -> None:
    """Wait for every rank, drop the references ``comm`` caches to process groups, then destroy them.

    ``comm._get_global_gloo_group`` (ours and Detectron2's) is an lru_cache that, under gloo, holds the default
    process group itself; if it outlives ``destroy_process_group`` it is destructed during interpreter shutdown,
    which aborts the process ("terminate called without an active exception") in about one run in five.
    """
    comm_module.synchronize()
    for cached in ("_get_global_gloo_group", "create_local_process_group"):
        fn = getattr(comm_module, cached, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    if hasattr(comm_module, "_LOCAL_PROCESS_GROUP"):
        comm_module._LOCAL_PROCESS_GROUP = None
    dist.destroy_process_group()
