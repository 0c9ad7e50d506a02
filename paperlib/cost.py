"""Cost measurements: time, memory and FLOPs of training and inference, one point per process.

The cost study (``notebooks/03_cost.ipynb``, :mod:`paperlib.studies.cost`) and ``paperlib bench``
measure through this module. A *point* is one model, device and shape measured one way:

* :class:`TrainStepPoint`: one optimizer step (all-position CE + Adam) on a batch of ``batch``
  sequences of ``length`` items, i.e. ``batch · length`` (prefix, target) pairs (random ids);
* :class:`InferencePoint`: scoring every item for a batch of ``batch`` users with histories of
  ``length`` items (``model.score``), random ids or the test histories of a real dataset;
* :class:`EpochPoint`: training steps of batches of ``batch_size`` (prefix, target) pairs drawn from
  a real dataset's epoch (the whole epoch, or its first ``steps`` batches, their time scaled to the
  epoch's number of steps, which the record says);
* :class:`StreamPoint`: what an online service does when a user acts: update one user's scores
  after one new item, given the ``history`` items already seen, by a constant-size state step
  (Mamba4Rec, GRU4Rec), a key/value cache step (SASRec) or recomputing the whole sequence.

Each point runs in a fresh process (:func:`run_point`), forked from a server process that has
imported torch and the models once, so that a point's memory is its own, a point that runs out of
memory or time is recorded and the sweep goes on, and no point inherits another's allocator state.
Within the process, ``warmup`` untimed runs precede ``repeats`` timed ones; the record keeps every
timed run (seconds and peak memory), summarised as median and quartiles by :func:`summary`.

What the numbers mean:

* **time**: wall-clock seconds of one run (``torch.cuda.synchronize`` around it on a GPU);
* **peak memory**: on a GPU, ``torch.cuda.max_memory_allocated`` (reset before each run) minus the
  bytes allocated before the model was built: parameters, optimizer state, batch, activations and
  temporaries, as PyTorch allocates them. On a CPU, the peak resident set of the point's process
  during the run (Linux ``VmHWM``, reset before each run through ``/proc/self/clear_refs``) minus its
  resident set before the model was built; a tiny run of the same code comes first, so that
  compiled kernels and lazily loaded libraries are not counted. It is what the process needed from
  the operating system, allocator overhead included; where ``clear_refs`` cannot be written the
  peak is the process's peak since it started (``ru_maxrss``), which the record says;
* **out of memory**: on a CPU a point may use ``memory_limit`` bytes above what the process held
  at its start (``RLIMIT_DATA``), so that it fails with an allocation error instead of waking the
  system's out-of-memory killer; on a GPU the device's own memory is the limit;
* **FLOPs per item**: matrix-product FLOPs (``torch.utils.flop_counter``; 2 per multiply-add) of a
  forward pass over one history of ``length`` items, divided by ``length``; attention is counted as
  the full L × L products (torch's convention, the causal mask not halving it); the selective scan,
  which the counter cannot see into, adds ``6 · E · N`` per item and Mamba layer (decay · state,
  input · B and state · C, each a multiply and an add; the exponential not counted).

Bad input gets a clear error before any process starts: an unknown model, device or streaming mode
(:class:`paperlib.fields.ConfigError`), or a CUDA device where there is none.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paperlib.fields import Checked, ConfigError, param
from paperlib.models import MODELS, build_model

#: how a point can end
STATUSES = ("ok", "oom", "timeout", "error", "skipped")
#: streaming modes: a constant-size state step, a key/value-cache step, or recomputing the sequence
STREAM_MODES = ("step", "kv_cache", "recompute")
#: the models with each constant-size or cached streaming mode
STREAM_MODELS = {"step": ("mamba4rec", "gru4rec"), "kv_cache": ("sasrec",), "recompute": tuple(MODELS)}

GB = 2**30


# --------------------------------------------------------------------------------------------
# the machine


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine a measurement ran on: CPU, cores, memory, load average and GPU."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_total_gb": None if _meminfo("MemTotal") is None else round(_meminfo("MemTotal") / GB, 1),
        "memory_available_gb": None if _meminfo("MemAvailable") is None else round(_meminfo("MemAvailable") / GB, 1),
        "load_average": load_average(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / GB, 1)
    return info


def describe_device(device: str, threads: int = 0) -> str:
    """One line naming the device measured on: ``"cpu: Intel Xeon … (2 threads)"`` or the GPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {_cpu_name()} ({threads or usable_cores()} threads)"


def default_memory_limit() -> int | None:
    """Three quarters of the memory available now (Linux), the default cap of a CPU point."""
    available = _meminfo("MemAvailable")
    return None if available is None else int(0.75 * available)


def check_device_name(device: str) -> str:
    """``device`` if it is ``cpu``, ``cuda`` or ``cuda:N`` (whether or not this machine has it),
    else ConfigError."""
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def check_device(device: str) -> str:
    """``device`` if it names a device this machine has (``cpu``, ``cuda``, ``cuda:N``), else
    ConfigError."""
    check_device_name(device)
    if device != "cpu":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use 'cpu'")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


# --------------------------------------------------------------------------------------------
# memory and time of the code inside a point's process


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the resident set counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of runs above a baseline (see the module docstring for the definitions).

    >>> meter = MemoryMeter("cpu"); meter.set_baseline()   # before the model is built
    >>> meter.reset(); run(); meter.peak()                  # bytes above the baseline
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.base = 0
        self.method = ("cuda: torch.cuda.max_memory_allocated above the allocation before the model was built"
                       if self.cuda else "cpu: peak resident set (VmHWM, reset each run) above the resident set "
                       "before the model was built")
        if not self.cuda:
            try:
                self._rss()
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.resettable = True
            except OSError:
                self.resettable = False
                self.method = "cpu: peak resident set since the process started (ru_maxrss) above the resident " \
                              "set before the model was built (the peak could not be reset per run)"

    @staticmethod
    def _rss() -> int:
        return _status_bytes("VmRSS")

    def _now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        _trim_heap()
        return self._rss() if self.resettable else _maxrss()

    def set_baseline(self) -> None:
        """Take the memory held now as zero."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.base = self._now()

    def reset(self) -> None:
        """Start a new peak (before a run)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            if self.resettable:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")

    def peak(self) -> int:
        """Peak bytes above the baseline since the last ``reset``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return (_status_bytes("VmHWM") if self.resettable else _maxrss()) - self.base


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], warmup: int, repeats: int, device: str = "cpu",
              meter: MemoryMeter | None = None) -> tuple[list[float], list[int]]:
    """``warmup`` untimed calls of ``fn``, then ``repeats`` timed ones.

    Returns the seconds of each timed call and, with a ``meter``, each call's peak memory (bytes).
    """
    for _ in range(warmup):
        fn()
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        if meter is not None:
            meter.reset()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if meter is not None:
            peaks.append(meter.peak())
    return times, peaks


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of repeated measurements."""
    if not values:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    v = sorted(values)
    if len(v) >= 2:
        q25, _, q75 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q25 = q75 = v[0]
    return {"median": statistics.median(v), "q25": q25, "q75": q75, "min": v[0], "max": v[-1], "n": len(v)}


# --------------------------------------------------------------------------------------------
# inputs and counts


def random_train_batch(batch: int, length: int, n_items: int, seed: int = 0):
    """An all-position training batch of full rows: items and next items (batch, length) drawn
    uniformly from ``1..n_items``; ``batch · length`` (prefix, target) pairs."""
    from paperlib.data.sequences import TrainBatch

    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, length + 1), generator=g)
    return TrainBatch(items=items[:, :-1], targets=items[:, 1:], lengths=torch.full((batch,), length))


def random_histories(batch: int, length: int, n_items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full histories (batch, length) of uniform random ids and their lengths (batch,)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, n_items + 1, (batch, length), generator=g), torch.full((batch,), length)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def scan_flops_per_item(model: torch.nn.Module) -> int:
    """FLOPs of the selective scans per item (``6 · E · N`` per Mamba block; 0 without one)."""
    from paperlib.models.mamba_block import MambaBlock

    return sum(6 * m.d_inner * m.d_state for m in model.modules() if isinstance(m, MambaBlock))


def forward_flops_per_item(model: torch.nn.Module, length: int, n_items: int, device: str = "cpu") -> float:
    """Matrix-product FLOPs of a forward pass over one history of ``length`` items, per item (see
    the module docstring); the scoring head (``2 · D · (n_items + 1)`` per scored user) is not in it."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    items, _ = random_histories(1, length, n_items)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(items.to(device))
    model.train(was_training)
    return counter.get_total_flops() / length + scan_flops_per_item(model)


# --------------------------------------------------------------------------------------------
# points


@dataclass
class Point(Checked):
    """What every point has: the model, where it runs and how often it is timed.

    ``options`` are model config overrides (``{"n_layers": 2}``); ``max_len`` is set by the point
    (positional models get as many positions as the point's histories need).
    """

    model: str = param("sasrec", "registered model name", choices=tuple(MODELS))
    options: dict = param({}, "model config overrides, e.g. n_layers")
    device: str = param("cpu", "cpu, cuda or cuda:N")
    threads: int = param(0, "torch and numba threads in the point's process; 0 for every usable core", min=0)
    warmup: int = param(1, "untimed runs before the timed ones", min=0)
    repeats: int = param(5, "timed runs", min=1)
    seed: int = param(0, "seeds the model's initialisation and the random inputs", min=0)

    kind: ClassVar[str] = ""

    def validate(self) -> None:
        check_device(self.device)
        if "n_items" in self.options or "max_len" in self.options:
            raise ConfigError("options may not set n_items or max_len: the point sets them")

    def describe(self) -> str:
        """One line for progress output."""
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.kind} {self.model}{extra}"

    def build(self, n_items: int, max_len: int) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return build_model(self.model, n_items=n_items, max_len=max_len, **self.options).to(self.device)

    def measure(self) -> dict[str, Any]:
        """Run inside the point's own process; returns the measured values."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """The point's settings as a results record (its kind included)."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class TrainStepPoint(Point):
    """One training step (all-position full-softmax CE + Adam) on ``batch`` random full rows of
    ``length`` items: ``batch · length`` (prefix, target) pairs."""

    batch: int = param(16, "sequences per step", min=1)
    length: int = param(200, "items per sequence (L)", min=1)
    n_items: int = param(3416, "catalogue size (ML-1M's by default)", min=1)

    kind: ClassVar[str] = "train_step"

    def describe(self) -> str:
        return f"{super().describe()} B={self.batch} L={self.length}"

    def measure(self) -> dict[str, Any]:
        meter = MemoryMeter(self.device)
        _train_step(self.build(self.n_items, 8), random_train_batch(2, 8, self.n_items).to(self.device))()  # load code
        meter.set_baseline()
        model = self.build(self.n_items, self.length)
        batch = random_train_batch(self.batch, self.length, self.n_items, self.seed).to(self.device)
        times, peaks = time_runs(_train_step(model, batch), self.warmup, self.repeats, self.device, meter)
        return {"seconds": times, "peak_bytes": peaks, "memory_method": meter.method, "pairs": batch.n_pairs,
                "params": count_parameters(model),
                "flops_per_item": forward_flops_per_item(model, self.length, self.n_items, self.device)}


def _train_step(model: torch.nn.Module, batch) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``batch`` (the Adam state is created by the first call)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()

    return step


@dataclass
class InferencePoint(Point):
    """Scores over the whole catalogue for ``batch`` users (``model.score``, eval mode): random full
    histories of ``length`` items, or with ``dataset`` the test histories of its first ``batch`` users
    (at most the dataset's ``max_len`` items; ``length`` is then ignored)."""

    batch: int = param(16, "users per batch", min=1)
    length: int = param(200, "items per history (L)", min=1)
    n_items: int = param(3416, "catalogue size (ignored with a dataset)", min=1)
    dataset: str = param("", "a dataset's test histories instead of random ones; empty for random")
    max_users: int = param(0, "users of the dataset sampled first (0 for all)", min=0)

    kind: ClassVar[str] = "inference"

    def describe(self) -> str:
        where = f" on {self.dataset}" if self.dataset else f" L={self.length}"
        return f"{super().describe()} B={self.batch}{where}"

    def measure(self) -> dict[str, Any]:
        meter = MemoryMeter(self.device)
        if self.dataset:
            from paperlib.data import pad_right

            data = _load(self.dataset, self.max_users)
            histories, _ = data.eval_examples("test")
            items, lengths = pad_right(histories[: self.batch], data.max_len)
            n_items, max_len = data.n_items, data.max_len
        else:
            items, lengths = random_histories(self.batch, self.length, self.n_items, self.seed)
            n_items, max_len = self.n_items, self.length
        tiny_items, tiny_lengths = random_histories(2, 8, n_items)
        self.build(n_items, 8).eval().score(tiny_items.to(self.device), tiny_lengths.to(self.device))  # load code
        meter.set_baseline()
        model = self.build(n_items, max_len).eval()
        items, lengths = items.to(self.device), lengths.to(self.device)
        times, peaks = time_runs(lambda: model.score(items, lengths), self.warmup, self.repeats, self.device, meter)
        return {"seconds": times, "peak_bytes": peaks, "memory_method": meter.method, "users": int(items.shape[0]),
                "length": int(items.shape[1]), "params": count_parameters(model),
                "flops_per_item": forward_flops_per_item(model, int(items.shape[1]), n_items, self.device)}


def _load(dataset: str, max_users: int):
    from paperlib.data import load_dataset

    data = load_dataset(dataset)
    return data.subset(max_users, seed=0) if max_users else data


@dataclass
class EpochPoint(Point):
    """Training on a real dataset's epoch (windows in a shuffled order, batches of ``batch_size``
    (prefix, target) pairs, as :class:`paperlib.data.TrainLoader` forms them for training).

    Each timed run is the whole epoch (``steps`` 0), or its first ``steps`` batches, whose time is
    scaled to the epoch's number of steps (``epoch_seconds``; the record keeps ``steps_timed`` and
    ``steps_per_epoch``). Peak memory is over the run's steps, the batches themselves excluded.
    """

    dataset: str = param("ml-1m", "dataset whose training epoch is timed")
    batch_size: int = param(2048, "(prefix, target) pairs per step, as RecBole's train_batch_size", min=1)
    steps: int = param(20, "batches timed per run; 0 for the whole epoch", min=0)
    max_users: int = param(0, "users of the dataset sampled first (0 for all)", min=0)

    kind: ClassVar[str] = "epoch"

    def describe(self) -> str:
        return f"{super().describe()} on {self.dataset}, {self.batch_size} pairs a step"

    def measure(self) -> dict[str, Any]:
        from paperlib.data import TrainLoader

        meter = MemoryMeter(self.device)
        data = _load(self.dataset, self.max_users)
        loader = TrainLoader(data, self.batch_size, generator=torch.Generator().manual_seed(self.seed))
        epoch = [b.to(self.device) for b in loader]
        timed = epoch[: self.steps] if self.steps else epoch
        _train_step(self.build(data.n_items, data.max_len), timed[0])()  # load code
        meter.set_baseline()
        model = self.build(data.n_items, data.max_len).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one optimizer for the whole epoch

        def steps(batches) -> None:
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                model.loss(batch).backward()
                optimizer.step()

        steps(timed[: self.warmup])  # warm-up: the first few batches, not a whole run
        times, peaks = time_runs(lambda: steps(timed), 0, self.repeats, self.device, meter)
        scale = len(epoch) / len(timed)
        return {"seconds": times, "epoch_seconds": [t * scale for t in times], "peak_bytes": peaks,
                "memory_method": meter.method, "steps_timed": len(timed), "steps_per_epoch": len(epoch),
                "pairs_timed": sum(b.n_pairs for b in timed), "pairs_per_epoch": loader.n_pairs,
                "params": count_parameters(model)}


@dataclass
class StreamPoint(Point):
    """Latency of one user's update after one new item, ``history`` items already seen: the new
    hidden state, the scores of every item and the top 10.

    Modes: ``step`` (Mamba4Rec, GRU4Rec: one step of a constant-size state), ``kv_cache`` (SASRec:
    one query against the cached keys and values of the history), ``recompute`` (any model: score
    the whole history plus the new item from scratch). ``state_bytes`` is what the service keeps
    per user between items: the recurrent state, the key/value cache, or the history's item ids.
    """

    mode: str = param("step", "step, kv_cache or recompute", choices=STREAM_MODES)
    history: int = param(200, "items already seen", min=1)
    n_items: int = param(3416, "catalogue size", min=1)
    warmup: int = param(3, "untimed updates before the timed ones", min=0)
    repeats: int = param(30, "timed updates", min=1)

    kind: ClassVar[str] = "stream"

    def validate(self) -> None:
        super().validate()
        if self.model not in STREAM_MODELS[self.mode]:
            raise ConfigError(f"streaming mode {self.mode!r} is for {', '.join(STREAM_MODELS[self.mode])}, "
                              f"not {self.model!r}; 'recompute' works for every model")

    def describe(self) -> str:
        return f"{super().describe()} {self.mode} history={self.history}"

    def measure(self) -> dict[str, Any]:
        # positions for the history, the new item and BERT4Rec's appended [MASK]
        model = self.build(self.n_items, self.history + 2).eval()
        items, _ = random_histories(1, self.history + 1, self.n_items, self.seed)
        items = items.to(self.device)
        history, new = items[:, :-1], items[:, -1]
        table = model.output_embedding()
        with torch.no_grad():
            if self.mode == "recompute":
                lengths = torch.tensor([self.history + 1], device=self.device)

                def update() -> torch.Tensor:
                    return model.score(items, lengths).topk(10).indices

                state_bytes = items.nelement() * items.element_size()
            elif self.mode == "kv_cache":
                _, cache = model.prefill(history, capacity=self.history + 1)

                def update() -> torch.Tensor:
                    cache.truncate(self.history)  # every timed update adds the same item to the same history
                    hidden, _ = model.step(new, cache)
                    return (hidden @ table.t()).topk(10).indices

                update()
                state_bytes = cache.nbytes()
            else:
                _, state = model.prefill(history)

                def update() -> torch.Tensor:
                    hidden, _ = model.step(new, state)  # the input state is left unchanged
                    return (hidden @ table.t()).topk(10).indices

                state_bytes = _nbytes(state)
            times, _ = time_runs(update, self.warmup, self.repeats, self.device)
        return {"seconds": times, "state_bytes": state_bytes, "params": count_parameters(model)}


def _nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(s) for s in state)
    return 0


# --------------------------------------------------------------------------------------------
# running a point in its own process


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported torch and the models once (each point forks from it in
    about 50 ms); spawn where there is no forkserver."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            # torch._dynamo is imported by the first optimizer (5 s): once here, not in every point
            _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "paperlib.cost", "paperlib.models.mamba4rec"])
        else:  # pragma: no cover - Windows
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "Cannot allocate memory", "out of memory", "std::bad_alloc")
    )


def _child(point: Point, memory_limit: int | None, conn) -> None:
    """Body of a point's process: cap its memory, set its threads, measure, send the result."""
    gc.freeze()  # the objects inherited from the server stay put: gc.collect() then takes ms, not 0.5 s
    try:
        if memory_limit is not None and not point.device.startswith("cuda"):
            # RLIMIT_DATA caps the process's private writable memory: what it holds now plus the limit
            held = _status_bytes("VmData")
            resource.setrlimit(resource.RLIMIT_DATA, (held + memory_limit, resource.RLIM_INFINITY))
        threads = point.threads or usable_cores()
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:  # pragma: no cover - numba is a dependency
            pass
        conn.send(("ok", point.measure()))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        status = "oom" if _is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        conn.send((status, message if status == "oom" else message + "\n" + traceback.format_exc()[-2000:]))
    finally:
        conn.close()


def run_point(point: Point, timeout_s: float = 600.0, memory_limit: int | None = None) -> dict[str, Any]:
    """Measure ``point`` in a fresh process and return its record.

    Args:
        point: what to measure.
        timeout_s: a point still running after this many seconds is stopped (status ``timeout``).
        memory_limit: bytes a CPU point may allocate above what its process held at its start; an
            allocation beyond fails in the point, which is recorded as out of memory (``oom``).
            None: no limit beyond the machine's.

    Returns:
        ``point.record()`` plus ``status`` (one of :data:`STATUSES`), ``message`` (the error, if
        any), the measured values (``seconds``, ``peak_bytes``, …), ``load_before`` and
        ``load_after`` (load averages), ``wall_seconds`` and, for CPU points, ``memory_limit``.
    """
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(point, memory_limit, send), daemon=True)
    record = point.record()
    record["load_before"] = load_average()
    start = time.perf_counter()
    process.start()
    send.close()
    status, payload = "error", "the point's process ended without a result"
    if receive.poll(timeout_s):
        try:
            status, payload = receive.recv()
        except EOFError:  # it died before sending: killed, most likely by the system for its memory
            process.join(5)
            code = process.exitcode
            status = "oom" if code == -9 else "error"
            payload = f"the point's process was killed (exit code {code})" + (
                "; signal 9 is what the system's out-of-memory killer sends" if code == -9 else "")
    else:
        status, payload = "timeout", f"stopped after {timeout_s:g} s"
        process.kill()
    process.join(10)
    receive.close()
    record["wall_seconds"] = time.perf_counter() - start
    record["load_after"] = load_average()
    if not point.device.startswith("cuda"):
        record["memory_limit"] = memory_limit
    record["status"] = status
    if status == "ok":
        record["message"] = ""
        record.update(payload)
    else:
        record["message"] = payload
    return record


def run_points(points: Iterable[Point], timeout_s: float = 600.0, memory_limit: int | None = None,
               progress: bool = True, skip_after_failure: bool = True) -> list[dict[str, Any]]:
    """Run ``points`` in order, each in its own process (:func:`run_point`).

    With ``skip_after_failure``, a point whose model, kind and options already ran out of memory or
    time at a smaller size (batch, length or history) is not run but recorded as ``skipped``, with
    the reason, since a larger one needs at least as much.
    """
    records: list[dict[str, Any]] = []
    failed: dict[tuple, tuple[int, str]] = {}  # (kind, model, options, mode) → (size, status) of a failure
    points = list(points)
    for i, point in enumerate(points, 1):
        key, size = _family(point)
        if skip_after_failure and key in failed and size >= failed[key][0]:
            record = {**point.record(), "status": "skipped", "load_before": None, "load_after": None,
                      "wall_seconds": 0.0,
                      "message": f"not run: {failed[key][1]} at the smaller size {failed[key][0]}"}
        else:
            record = run_point(point, timeout_s, memory_limit)
            if record["status"] in ("oom", "timeout") and (key not in failed or size < failed[key][0]):
                failed[key] = (size, "out of memory" if record["status"] == "oom" else "timeout")
        records.append(record)
        if progress:
            print(f"[{i}/{len(points)}] {point.describe()}: {brief(record)}", flush=True)
    return records


def _family(point: Point) -> tuple[tuple, int]:
    """Points that differ only in size, and the size (larger needs at least as much)."""
    opts = tuple(sorted((k, str(v)) for k, v in point.options.items()))
    size = getattr(point, "length", 0) * getattr(point, "batch", 1) + getattr(point, "history", 0)
    return (point.kind, point.model, opts, getattr(point, "mode", ""), point.device), size


def brief(record: dict[str, Any]) -> str:
    """``1.234 s [1.200–1.300], peak 0.52 GB`` for an ok record, the status and message otherwise."""
    if record["status"] != "ok":
        return f"{record['status'].upper()}: {record['message'].splitlines()[0] if record['message'] else ''}"
    s = summary(record["seconds"])
    text = f"{fmt_seconds(s['median'])} [{fmt_seconds(s['q25'])}–{fmt_seconds(s['q75'])}]"
    if record.get("peak_bytes"):
        text += f", peak {summary(record['peak_bytes'])['median'] / GB:.3f} GB"
    if record.get("load_before"):
        text += f" (load {record['load_before'][0]:.1f})"
    return text


def fmt_seconds(s: float) -> str:
    """Seconds with a unit that keeps three significant digits (µs, ms or s)."""
    if s != s:  # NaN
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


# --------------------------------------------------------------------------------------------
# reading records


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(size): ``value ∝ size^slope``. None with fewer
    than two points."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(sizes, values) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def crossover(sizes: Sequence[float], ours: Sequence[float | None], theirs: Sequence[float | None]) -> dict[str, Any]:
    """Where ``ours`` becomes and stays cheaper than ``theirs`` over increasing ``sizes``.

    A value of None is a point that did not fit (out of memory or time): cheaper than any measured
    value, and never cheaper itself. Returns ``{"from": the smallest size from which ours is
    cheaper at every larger measured size (None if never), "estimate": the size where the log-log
    line between the two bracketing sizes crosses 1 (None when ours is cheaper from the first size
    or never, or a bracketing point did not fit), "always": ours cheaper at every size,
    "never": at none}``.
    """
    import math

    cheaper = []
    for a, b in zip(ours, theirs):
        if a is None and b is None:
            cheaper.append(None)  # neither fits: no comparison
        elif a is None:
            cheaper.append(False)
        elif b is None:
            cheaper.append(True)
        else:
            cheaper.append(a < b)
    known = [(s, c, a, b) for s, c, a, b in zip(sizes, cheaper, ours, theirs) if c is not None]
    start = None
    for i in range(len(known) - 1, -1, -1):  # the longest run of "cheaper" reaching the largest size
        if known[i][1]:
            start = i
        else:
            break
    out: dict[str, Any] = {"from": None if start is None else known[start][0], "estimate": None,
                           "always": start == 0 and bool(known), "never": start is None}
    if start is not None and start > 0:
        (s0, _, a0, b0), (s1, _, a1, b1) = known[start - 1], known[start]
        if None not in (a0, b0, a1, b1):
            r0, r1 = math.log(a0 / b0), math.log(a1 / b1)  # r0 >= 0 > r1
            t = r0 / (r0 - r1) if r0 != r1 else 0.0
            out["estimate"] = math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
    return out


__all__ = [
    "EpochPoint", "InferencePoint", "MemoryMeter", "Point", "STATUSES", "STREAM_MODELS", "STREAM_MODES",
    "StreamPoint", "TrainStepPoint", "brief", "check_device", "check_device_name", "count_parameters", "crossover",
    "default_memory_limit", "describe_device", "fit_exponent", "fmt_seconds", "forward_flops_per_item",
    "load_average", "machine_info", "random_histories", "random_train_batch", "run_point", "run_points",
    "summary", "time_runs", "usable_cores",
]
