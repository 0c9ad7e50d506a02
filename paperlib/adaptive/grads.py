"""Gradient matrices G for the batch-size tests, from a torch model.

Two ways to get the rows of G (see :mod:`paperlib.adaptive.batch_tests` for how they are used):

* :func:`group_gradients` (``rows="groups"``, any model): split the batch into m micro-batches
  (:func:`split_batch`), one ordinary backward pass each; row j is micro-batch j's mean gradient.
  It also returns the full-batch mean gradient (the size-weighted mean of the rows), which
  :func:`set_flat_grad` puts into ``p.grad`` so the optimizer step needs no further backward.
* :func:`per_example_gradients` (``rows="examples"``, small models): the exact per-example
  gradients with ``torch.func`` (``functional_call`` + ``vmap(grad(...))``).

Measured cost (``from paperlib.adaptive.grads import print_costs; print_costs()``): a machine
with 2 CPU cores shared with other jobs (load average about 4), torch 2.13, one thread; MLP
256-512-512-10 (0.40 M parameters), batch 256, cross-entropy, forward + backward; time is the
fastest of 20 calls after a warm-up (load only ever adds time); memory is the growth of the peak
resident set of a fresh process over one call.

=====================================  =========  ===========  ===========
method                                 time (ms)  vs backward  memory (MB)
=====================================  =========  ===========  ===========
one backward of the batch (baseline)         4.6          1.0         14.5
4 micro-batch backwards into p.grad          6.8          1.5         13.2
group_gradients, m = 4                       8.7          1.9         23.7
16 micro-batch backwards into p.grad        14.5          3.2         12.1
group_gradients, m = 16                     25.5          5.6         41.6
per_example_gradients (chunks of 32)       437.8           96        522.8
=====================================  =========  ===========  ===========

So on a small model the group estimate costs about 2x one backward with m = 4 and 5-6x with
m = 16: part is the smaller, less efficient matrix products of micro-batches (the "backwards into
p.grad" rows, the same work without G), part is writing and reading the m x P matrix G
(m x 1.6 MB here). The first part should shrink where a micro-batch still keeps the hardware
busy (larger models, a GPU; not measured here). Per-example gradients materialise a b x P matrix (here 256 x 0.40 M floats,
409 MB) and cost about 100 backwards on this CPU: only for small models.

Caveats: layers that mix the examples of a batch (batch norm) see micro-batch statistics; dropout
draws independent masks in each micro-batch (and each example under vmap), as it would in any
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class BatchGradients:
    """Rows of G for the batch-size tests, and the batch's mean gradient.

    Attributes:
        rows: (n, P) flattened gradients, one per micro-batch or per example.
        sizes: (n,) int64, the number of examples behind each row.
        mean: (P,) the batch's mean gradient, ``sum_j sizes_j rows_j / sum_j sizes_j``.
        loss: the batch's mean loss (size-weighted mean of the per-row losses).
        kind: "groups" or "examples", the ``rows`` argument of the tests.
    """

    rows: torch.Tensor
    sizes: torch.Tensor
    mean: torch.Tensor
    loss: float
    kind: Literal["groups", "examples"]

    @property
    def batch_size(self) -> int:
        return int(self.sizes.sum())

    def test_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the tests and ``BatchSizeController.update``:
        ``update(g.rows, **g.test_kwargs())``."""
        if self.kind == "examples":
            return {"rows": "examples"}
        return {"rows": "groups", "group_sizes": self.sizes}


def _leading_size(batch: Any) -> int:
    """Number of examples in a micro-batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("a micro-batch tensor needs a batch dimension, got a 0-dim tensor")
        return batch.shape[0]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        return _leading_size(batch[0])
    raise ValueError(f"cannot tell the size of a micro-batch of type {type(batch).__name__}; "
                     "pass sizes=[...] explicitly")


def split_batch(batch: torch.Tensor | Sequence[torch.Tensor], m: int) -> list[Any]:
    """Split a batch (a tensor, or a tuple/list of tensors with the same first dimension b) into
    m micro-batches along dim 0, of sizes differing by at most one.

    Returns:
        list of m micro-batches, each of the same structure as ``batch``.
    """
    tensors = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    b = tensors[0].shape[0]
    if any(t.shape[0] != b for t in tensors):
        raise ValueError(f"all tensors of a batch need the same first dimension, got {[t.shape[0] for t in tensors]}")
    if not 1 <= m <= b:
        raise ValueError(f"cannot split a batch of {b} examples into m={m} micro-batches (need 1 <= m <= {b})")
    parts = [torch.tensor_split(t, m) for t in tensors]
    if isinstance(batch, torch.Tensor):
        return list(parts[0])
    return [type(batch)(p[j] for p in parts) if isinstance(batch, tuple) else [p[j] for p in parts]
            for j in range(m)]


def group_gradients(
    params: Iterable[torch.Tensor],
    loss_fn: Callable[[Any], torch.Tensor],
    microbatches: Iterable[Any],
    sizes: Sequence[int] | None = None,
) -> BatchGradients:
    """Mean gradient of each micro-batch, flattened into the rows of G (``rows="groups"``).

    One backward pass per micro-batch: together the arithmetic of one backward of the whole batch,
    in m smaller pieces (measured cost in the module docstring). ``p.grad`` is not touched; put
    ``result.mean`` there with :func:`set_flat_grad` and take the optimizer step.

    Args:
        params: the parameters to differentiate (their order fixes the flattening).
        loss_fn: ``loss_fn(microbatch)`` -> scalar *mean* loss over the micro-batch's examples.
        microbatches: the m >= 1 micro-batches of one step (e.g. from :func:`split_batch`).
        sizes: examples in each micro-batch; by default the first dimension of its first tensor.

    Returns:
        BatchGradients with rows (m, P), sizes (m,), the batch's mean gradient (P,) and loss.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires a gradient")
    microbatches = list(microbatches)
    m = len(microbatches)
    if m == 0:
        raise ValueError("no micro-batches given")
    if sizes is not None and len(sizes) != m:
        raise ValueError(f"sizes has {len(sizes)} entries for {m} micro-batches")
    counts = [int(sizes[j]) if sizes is not None else _leading_size(mb) for j, mb in enumerate(microbatches)]
    if min(counts) < 1:
        raise ValueError(f"micro-batch {counts.index(min(counts))} is empty")
    # rows are written in place: no per-row concatenation and no final stack (m x P copies)
    G = torch.zeros(m, sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    losses = []  # kept as tensors: no device synchronisation per micro-batch
    for j, mb in enumerate(microbatches):
        loss = loss_fn(mb)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar mean loss, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        offset = 0
        for p, g in zip(params, grads):
            if g is not None:  # an unused parameter keeps its zero gradient
                G[j, offset:offset + p.numel()].copy_(g.reshape(-1))
            offset += p.numel()
        losses.append(loss.detach())
    w = torch.tensor(counts, dtype=torch.int64)
    wf = w.to(G.dtype).to(G.device)
    mean = (wf @ G) / sum(counts)
    loss = float(wf @ torch.stack(losses).to(G.dtype)) / sum(counts)
    return BatchGradients(G, w, mean, loss, "groups")


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = 32,
) -> BatchGradients:
    """Exact per-example gradients with ``torch.func`` (``rows="examples"``); small models only.

    Each example i is run alone as a batch of one: ``loss_fn(model(inputs[i:i+1]),
    targets[i:i+1])``, differentiated with ``torch.func.grad`` and vectorised with ``vmap``
    (random layers such as dropout draw an independent mask per example). The flattening order
    is that of ``model.parameters()`` with ``requires_grad``, as :func:`set_flat_grad` expects.

    Args:
        model: the model; its buffers are used as constants.
        loss_fn: ``loss_fn(output, target)`` -> scalar mean loss of a batch.
        inputs: (b, ...) model inputs.
        targets: (b, ...) targets.
        chunk_size: examples per vmap call: the memory beyond G is about that of one chunk's
            gradients and activations; None = the whole batch in one call.

    Returns:
        BatchGradients with rows (b, P), sizes all ones, the mean gradient (P,) and mean loss.
    """
    from torch.func import functional_call, grad_and_value, vmap

    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}")
    named = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("no parameter of the model requires a gradient")
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_one(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (weights, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    per_example = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0), randomness="different")
    b = inputs.shape[0]
    step = b if chunk_size is None else chunk_size
    # each chunk's per-parameter gradients are copied into the preallocated G at once, so the
    # peak is G plus one chunk rather than twice G
    first = next(iter(named.values()))
    G = torch.empty(b, sum(p.numel() for p in named.values()), dtype=first.dtype, device=first.device)
    losses = torch.empty(b, dtype=first.dtype, device=first.device)
    for start in range(0, b, step):
        stop = min(start + step, b)
        grads, losses[start:stop] = per_example(named, inputs[start:stop], targets[start:stop])
        offset = 0
        for name, p in named.items():
            G[start:stop, offset:offset + p.numel()].copy_(grads[name].reshape(stop - start, -1))
            offset += p.numel()
        del grads
    return BatchGradients(G, torch.ones(b, dtype=torch.int64), G.mean(0), float(losses.mean()), "examples")


def set_flat_grad(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flattened gradient (P,) into ``p.grad`` of the parameters that require one, in
    order (the layout of :func:`group_gradients` and :func:`per_example_gradients`)."""
    params = [p for p in params if p.requires_grad]
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat gradient has shape {tuple(flat.shape)}, the parameters need ({total},)")
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
        offset += p.numel()


# --- cost measurement (print_costs) ------------------------------------------

def _bench_child(method: str, queue: Any) -> None:  # pragma: no cover - runs in a subprocess
    import resource
    import time

    torch.set_num_threads(1)
    torch.manual_seed(0)
    b, sizes = 256, (256, 512, 512, 10)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x, y = torch.randn(b, sizes[0]), torch.randint(0, sizes[-1], (b,))
    ce = nn.functional.cross_entropy
    params = list(model.parameters())

    def run() -> None:
        if method == "backward":
            model.zero_grad()
            ce(model(x), y).backward()
        elif method.startswith("loop"):  # m backward passes into p.grad: the cost without G
            model.zero_grad()
            for xj, yj in split_batch((x, y), int(method.split("=")[1])):
                ce(model(xj), yj).backward()
        elif method.startswith("groups"):
            m = int(method.split("=")[1])
            group_gradients(params, lambda mb: ce(model(mb[0]), mb[1]), split_batch((x, y), m))
        else:
            per_example_gradients(model, ce, x, y)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = []
    for _ in range(20):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    # the minimum: the machine is shared, and other load only ever adds time
    queue.put((method, min(times) * 1e3, peak_mb, sum(p.numel() for p in params)))


def measure_costs() -> list[tuple[str, float, float, int]]:
    """Time and peak memory of each way to get G on a small MLP, each in a fresh process.

    Returns:
        rows (method, fastest of 20 runs in milliseconds, peak memory growth in MB, parameters).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = []
    for method in ("backward", "loop m=4", "groups m=4", "loop m=16", "groups m=16", "per-example"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_bench_child, args=(method, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    return results


def print_costs() -> None:  # pragma: no cover - a measurement, run by hand
    """Print :func:`measure_costs` as the table of the module docstring."""
    rows = measure_costs()
    base = rows[0][1]
    print(f"MLP with {rows[0][3]:,} parameters, batch 256, 1 thread")
    for method, ms, mb, _ in rows:
        print(f"{method:14s} {ms:8.1f} ms  x{ms / base:5.2f}  peak +{mb:7.1f} MB")
