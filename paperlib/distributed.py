"""Training on several processes, GPUs or machines with PyTorch's own distributed engine.

Two ways to spread the work, which combine:

* **one run on several processes** (``torchrun --nproc_per_node N``, or ``paperlib run … --nproc
  N``): :func:`init_from_env` joins the process group torchrun describes in the environment
  (gloo on CPU, nccl on GPU) and :class:`paperlib.train.Trainer` then trains with
  ``DistributedDataParallel``. The helpers here are what the trainer needs: rank and world size,
  the rank's share of a batch (:func:`share_bounds`), all-reduces and gathers, a check that every
  rank holds the same data (:func:`check_same`), and a broadcast of rank 0's checkpoint.
* **many runs on many machines** (``paperlib run 02_quality --preset paper --shard 2/8``): a
  :class:`Shard` takes every n-th run of a study, each shard writes its partial results, and
  :func:`merge_partials` combines the partials into the one results JSON the notebook renders,
  refusing partials of other code or settings, overlapping ones and incomplete sets.

Timeouts: joining the group and every collective operation wait at most ``timeout_s`` (default
:data:`DEFAULT_TIMEOUT_S` seconds, or ``$PAPERLIB_DIST_TIMEOUT``); a rendezvous that does not
complete in that time fails with :class:`DistributedError`, never hangs.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: seconds a rendezvous or a collective operation may wait for the other ranks
DEFAULT_TIMEOUT_S = 300.0
#: the environment torchrun sets for every worker
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A process group that cannot be joined, or ranks that disagree; the message says how to fix it."""


# --------------------------------------------------------------------------- process group
def timeout_from_env() -> float:
    """``$PAPERLIB_DIST_TIMEOUT`` in seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("PAPERLIB_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise DistributedError(f"PAPERLIB_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise DistributedError(f"PAPERLIB_DIST_TIMEOUT must be > 0 seconds, got {value}")
    return value


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (torchrun sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def init_from_env(timeout_s: float | None = None, backend: str | None = None) -> None:
    """Join the process group that torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Backend: nccl when CUDA is available (each rank then uses GPU ``LOCAL_RANK``), else gloo.
    Already joined: nothing to do.

    Raises:
        DistributedError: a variable is missing or malformed, or the other ranks did not join
            within ``timeout_s`` seconds (the message names the address and the world size).
    """
    if dist.is_initialized():
        return
    missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"cannot join a process group: {', '.join(missing)} not set. Start the program with torchrun "
            "(torchrun --nproc_per_node N -m paperlib.cli compute …) or paperlib run … --nproc N")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                               + ", ".join(f"{k}={os.environ[k]!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
                               ) from None
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} must lie in 0..WORLD_SIZE-1={world - 1}")
    timeout_s = timeout_from_env() if timeout_s is None else timeout_s
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)  # before the group exists: nccl binds each rank to its GPU
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (dist.DistError, RuntimeError) as exc:
        raise DistributedError(
            f"rank {rank} of {world}: the rendezvous at {where} did not complete within {timeout_s:g} s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Check that all {world} processes were "
            "started with the same MASTER_ADDR and MASTER_PORT and can reach that address; raise the "
            "wait with PAPERLIB_DIST_TIMEOUT") from exc


def destroy() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; 0 without a group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """The rank within this machine (torchrun's ``LOCAL_RANK``); 0 without a group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    """True on rank 0 (and without a group): the process that writes files."""
    return rank() == 0


def active() -> bool:
    """True when the work is spread over more than one process."""
    return world_size() > 1


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a group (one GPU
    per rank); any other device is returned as it is."""
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", local_rank())
    return device


def _comm_device() -> torch.device:
    """Where tensors must be for collectives: the rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


# --------------------------------------------------------------------------- collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor on ``tensor``'s device; a copy without a group)."""
    if not active():
        return tensor.clone()
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for checkpoints and small decisions)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_varlen(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), in rank order, on ``tensor``'s device."""
    if not active():
        return [tensor]
    dev = _comm_device()
    n = torch.tensor([tensor.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=dev)
    padded[: tensor.numel()] = tensor.reshape(-1).to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[: int(s.item())].to(tensor.device) for p, s in zip(parts, sizes)]


def check_same(value: str, what: str) -> None:
    """Raise :class:`DistributedError` on *every* rank unless all ranks pass the same ``value``
    (a checksum, a setting): gathered, then compared, so no rank is left waiting."""
    if not active():
        return
    digest = torch.frombuffer(bytearray(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8)
    gathered = all_gather_varlen(digest)
    differ = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
    if differ:
        raise DistributedError(
            f"rank {rank()}: ranks disagree on {what}: rank(s) {differ} differ from rank 0. Every rank must "
            "load the same data with the same settings (same files, same PAPERLIB_DATA contents)")


def data_checksum(data: Any) -> str:
    """SHA-256 of a :class:`~paperlib.data.sequences.SequentialData`'s sequences, catalogue size and
    ``max_len``: equal exactly when two ranks would train on the same data."""
    h = hashlib.sha256(f"{data.n_items}:{data.max_len}:{data.n_users}".encode())
    for s in data.sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


# --------------------------------------------------------------------------- batch shares
def share_bounds(counts: Sequence[int] | np.ndarray, world: int) -> list[tuple[int, int]]:
    """Split windows holding ``counts`` targets each into ``world`` consecutive parts of nearly
    equal pairs: part r is ``[start, stop)``. A window is never split, so a part may be empty when
    the batch has fewer windows than ranks.

    Window j goes to the part whose share of the pairs holds the middle of the window's targets
    (``floor((before_j + count_j / 2) * world / total)``): the parts then differ by at most about
    one window's pairs.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if total == 0:
        return [(0, 0)] * world
    middle = np.cumsum(counts) - counts / 2.0
    owner = np.minimum((middle * world / total).astype(np.int64), world - 1)
    starts = np.searchsorted(owner, np.arange(world), side="left")
    stops = np.searchsorted(owner, np.arange(world), side="right")
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


# --------------------------------------------------------------------------- shards of a study
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based: ``2/8`` is the second of eight) of a study's runs.

    Runs are dealt round-robin in the study's order (run j goes to shard ``j % count + 1``), so
    every shard gets a mix of datasets and models rather than one dataset's runs.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 1 <= i <= n (e.g. 2/8, the second of eight)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"2/8"`` → ``Shard(2, 8)``; anything else is a clear error."""
        i, slash, n = str(text).partition("/")
        if not slash or not i.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"--shard takes i/n, e.g. 2/8 (the second of eight shards), got {text!r}")
        return cls(int(i), int(n))

    def select(self, n_runs: int) -> list[int]:
        """Indices (in the study's order) of the runs this shard computes."""
        if self.count > n_runs:
            raise ValueError(f"{self.count} shards for {n_runs} runs: every shard needs a run, use at most {n_runs}")
        return list(range(self.index - 1, n_runs, self.count))

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


#: parameters that may differ between the machines of a sharded study (where each writes)
LOCAL_PARAMS = ("output_dir",)


def merge_partials(docs: Sequence[Mapping[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """Combine the partial results of every shard of one study into one results payload.

    Each partial (``paperlib.results.save_partial_results``) holds ``study``, ``preset``,
    ``params``, ``code`` (fingerprint of the training code) and ``shard`` (``index``, ``count``,
    ``runs``: indices of its runs in the study's order, ``total``), and a payload whose ``runs``
    list holds its runs in that order; every other payload entry is shared (equal where two
    partials both have a key, merged where they are mappings).

    Returns:
        ``{"params": …, "results": merged payload (runs in the study's order), "shards":
        [provenance of each partial]}``.

    Raises:
        ValueError: naming the files, for partials of other studies, presets, settings or code,
            overlapping shards, or a missing shard.
    """
    if not docs:
        raise ValueError("no partial results to merge: compute them with paperlib run … --shard i/n")
    first, where0 = docs[0], sources[0]
    for doc, where in zip(docs, sources):
        for key in ("study", "preset", "code"):
            if doc.get(key) != first.get(key):
                raise ValueError(f"cannot merge {where} with {where0}: different {key} "
                                 f"({doc.get(key)!r} vs {first.get(key)!r}); recompute the shards with the same "
                                 f"{'training code' if key == 'code' else key}")
        differ = sorted(k for k in set(doc["params"]) | set(first["params"])
                        if k not in LOCAL_PARAMS and doc["params"].get(k) != first["params"].get(k))
        if differ:
            raise ValueError(f"cannot merge {where} with {where0}: different settings: "
                             + ", ".join(f"{k}={doc['params'].get(k)!r} vs {first['params'].get(k)!r}" for k in differ))
        if doc["shard"]["count"] != first["shard"]["count"] or doc["shard"]["total"] != first["shard"]["total"]:
            raise ValueError(f"cannot merge {where} (shard {doc['shard']['index']}/{doc['shard']['count']}) with "
                             f"{where0} (shard {first['shard']['index']}/{first['shard']['count']}): the study was "
                             "split differently")
    owners: dict[int, str] = {}
    for doc, where in zip(docs, sources):
        i = doc["shard"]["index"]
        if i in owners:
            raise ValueError(f"shard {i}/{doc['shard']['count']} appears twice ({owners[i]} and {where}): "
                             "keep one of them")
        owners[i] = where
    count = first["shard"]["count"]
    missing = [i for i in range(1, count + 1) if i not in owners]
    if missing:
        raise ValueError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing: compute them with "
                         f"paperlib run … --shard i/{count}, then merge again")
    by_index: dict[int, Any] = {}
    payload: dict[str, Any] = {}
    for doc, where in zip(docs, sources):
        indices, runs = doc["shard"]["runs"], doc["results"]["runs"]
        if len(indices) != len(runs):
            raise ValueError(f"{where}: {len(runs)} runs but {len(indices)} run indices: the file is damaged")
        for i, run in zip(indices, runs):
            if i in by_index:
                raise ValueError(f"run {i} is in two partials ({where} and another): the shards overlap")
            by_index[i] = run
        _merge_shared(payload, {k: v for k, v in doc["results"].items() if k != "runs"}, where)
    if sorted(by_index) != list(range(first["shard"]["total"])):
        raise ValueError(f"the partials hold {len(by_index)} of the study's {first['shard']['total']} runs")
    payload["runs"] = [by_index[i] for i in range(first["shard"]["total"])]
    params = {k: v for k, v in first["params"].items()}
    return {"params": params, "results": payload,
            "shards": [{"shard": d["shard"]["index"], "source": s, **d.get("provenance", {})}
                       for d, s in sorted(zip(docs, sources), key=lambda x: x[0]["shard"]["index"])]}


def _merge_shared(into: dict[str, Any], new: Mapping[str, Any], where: str, path: str = "") -> None:
    """Merge a partial's shared payload entries: mappings are united, other values must agree."""
    for key, value in new.items():
        name = f"{path}{key}"
        if key not in into:
            into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        elif isinstance(value, Mapping) and isinstance(into[key], Mapping):
            _merge_shared(into[key], value, where, name + ".")
        elif into[key] != value:
            raise ValueError(f"{where}: {name} is {value!r} where another shard has {into[key]!r}: the shards "
                             "were computed on different data or settings")


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "Shard",
    "active",
    "all_gather_varlen",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_same",
    "data_checksum",
    "destroy",
    "init_from_env",
    "is_main",
    "launched_by_torchrun",
    "local_rank",
    "merge_partials",
    "rank",
    "rank_device",
    "share_bounds",
    "world_size",
]
