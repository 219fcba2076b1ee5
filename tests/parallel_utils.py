"""Running a function on N local processes joined in a gloo group (the tensor-parallel tests).

`spawn(fn, world, *args)` starts `world` processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free port), calls fn(rank, *args) in each (one intra-op thread: sums in a fixed order) and
returns what every rank returned, in rank order. A rank that raises fails the call with its traceback."""

import os
import pickle
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = RuntimeError(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        from diffusiongemma import parallel

        parallel.shutdown()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(fn, world: int, *args, tmp_path) -> list:
    port = free_port()
    mp.spawn(_worker, args=(world, port, fn, args, str(tmp_path)), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(os.path.join(tmp_path, f"{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results
