"""Expert parallelism on torch.distributed: experts sharded across ranks, tokens exchanged by all-to-all.

Papers: D. Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding",
ICLR 2021, arXiv:2006.16668 (experts sharded over devices, all-to-all dispatch and combine); W. Fedus, B. Zoph,
N. Shazeer, "Switch Transformers", JMLR 2022, arXiv:2101.03961 (data + expert parallelism).

Each of the W ranks holds its own tokens (data parallel), a replica of the router and of every dense layer (kept
in sync by DDP, :func:`dynaneural.engine.distributed.wrap_ddp`) and ``E / W`` experts: rank r owns experts
``[r·E/W, (r+1)·E/W)``. A layer call

1. routes its local tokens (the same :class:`~dynaneural.sample_wise.moe.moe_layer.MoEFeedForward` rules) and
   sorts the assignments by expert — which groups them by owner rank;
2. exchanges the per-expert counts (``all_to_all_single`` on an (E,) tensor), then the token rows
   (``all_to_all_single`` with uneven splits; the autograd version
   ``torch.distributed.nn.functional.all_to_all_single`` when gradients are needed);
3. regroups the received rows by local expert, runs each expert on its contiguous slice, restores the order and
   sends the results back by the reverse all-to-all; the weighted scatter-add back to the tokens is local.

Equivalence with one process (tested with 2 gloo processes): the load-balancing statistics are summed over ranks
(the counts by ``all_reduce``, the probabilities by the autograd ``all_reduce``), so the loss is that of the
whole batch on every rank; the expert gradients, which collect the losses of all W ranks through the
all-to-all, are divided by W so that they match DDP's averaging of the dense gradients. One step on W ranks
with B/W samples each then equals one step of the unsharded model on the B samples (up to float summation
order). Simulate mode needs every expert locally and is not available on a sharded layer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from dynaneural.sample_wise.moe.moe_layer import MoEFeedForward, Routing

__all__ = ["ExpertParallelMoEFeedForward", "expert_group", "shard_experts", "expert_parameter_names", "EquivalenceReport",
           "check_expert_parallel_equivalence"]


def _world(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class ExpertParallelMoEFeedForward(MoEFeedForward):
    """An :class:`MoEFeedForward` whose experts are sharded over the ranks of ``group`` (default:
    :func:`expert_group`; see the module docstring).

    Build it from an unsharded layer with :meth:`from_layer` (every rank builds the same full layer from the same
    seed, then keeps its slice) or through :func:`shard_experts` for a whole model.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, *, group: Any = None, **kwargs: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group, or run under torchrun)")
        self.group = group if group is not None else expert_group()
        self.rank, self.world_size = _world(self.group)
        if num_experts % self.world_size:
            raise ValueError(f"{num_experts} experts do not split evenly over {self.world_size} ranks")
        super().__init__(dim, hidden, num_experts, **kwargs)
        for p in (self.w_gate_up, self.w_down):
            p._dynaneural_expert_parallel = True  # type: ignore[attr-defined]  (DDP must not all-reduce these)
            if self.world_size > 1:
                # The all-to-all backward sums the gradients of every rank's loss into the owner; DDP averages the
                # dense gradients over ranks, so average these too.
                p.register_hook(lambda g, w=self.world_size: g / w)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first_local_expert(self) -> int:
        return self.rank * self.num_local_experts

    @classmethod
    def from_layer(cls, layer: MoEFeedForward, *, group: Any = None) -> ExpertParallelMoEFeedForward:
        """This rank's shard of ``layer``: the router, the shared expert and the options copied, experts
        ``[r·E/W, (r+1)·E/W)``."""
        new = cls(layer.dim, layer.hidden, layer.num_experts, group=group, top_k=layer.top_k,
                  routing=layer.routing, capacity_factor=layer.capacity_factor, group_size=layer.group_size,
                  normalize_weights=layer.normalize_weights,
                  straight_through_weights=layer.straight_through_weights, shared_hidden=layer.shared_hidden,
                  router_jitter=layer.router_jitter,
                  balance_coef=layer.balance_coef, z_coef=layer.z_coef, row_block=layer.row_block)
        lo, n = new.first_local_expert, new.num_local_experts
        with torch.no_grad():
            new.router.weight.copy_(layer.router.weight)
            if layer.shared is not None:
                new.shared.load_state_dict(layer.shared.state_dict())  # type: ignore[union-attr]
            new.w_gate_up.copy_(layer.w_gate_up[lo:lo + n])
            new.w_down.copy_(layer.w_down[lo:lo + n])
        return new.to(layer.router.weight.device)

    def _simulate(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        raise NotImplementedError("simulate mode computes every expert on every token and needs all experts "
                                  "locally; run the unsharded model (or use train/execute mode)")

    def _global_stats(self, counts: torch.Tensor, prob_sum: torch.Tensor, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.world_size == 1:
            return counts, prob_sum, n
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        if prob_sum.requires_grad:
            with _quiet_deprecation():
                prob_sum = dist_fn.all_reduce(prob_sum, group=self.group)
        else:
            prob_sum = _all_reduce(prob_sum.clone(), self.group)
        total = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(total, group=self.group)
        return counts, prob_sum, int(total)

    def _run_experts(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``xs`` (A, d) sorted by global expert, ``counts`` per global expert → results in the same order."""
        w, el = self.world_size, self.num_local_experts
        if w == 1:
            return super()._run_experts(xs, counts)
        counts_t = torch.tensor(counts, dtype=torch.long)
        recv_counts = torch.empty_like(counts_t)
        dist.all_to_all_single(recv_counts, counts_t, group=self.group)  # [s·el + j]: from rank s for expert j
        send_splits = counts_t.view(w, el).sum(1).tolist()
        recv_splits = recv_counts.view(w, el).sum(1).tolist()
        grad = torch.is_grad_enabled() and (xs.requires_grad or self.w_gate_up.requires_grad)
        xr = self._exchange(xs, recv_splits, send_splits, grad)  # (R, d), ordered (source rank, local expert)
        # Regroup by local expert (stable: source-rank order inside each expert), run, restore the order.
        row_expert = torch.arange(el).repeat(w).repeat_interleave(recv_counts)  # (R,)
        order = torch.argsort(row_expert, stable=True)
        local_counts = recv_counts.view(w, el).sum(0).tolist()
        ys_local = super()._run_experts(xr.index_select(0, order), local_counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        yr = ys_local.index_select(0, inverse)
        return self._exchange(yr, send_splits, recv_splits, grad)  # back to the senders, in their sorted order

    def _exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], grad: bool) -> torch.Tensor:
        out = x.new_empty(sum(out_splits), x.shape[1])
        if grad:
            with _quiet_deprecation():
                return dist_fn.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # torch.distributed.nn.functional is marked deprecated in favour of _functional_collectives, which has no
    # differentiable all_reduce; it still is the autograd all-to-all / all-reduce that works on gloo.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


_EXPERT_GROUPS: dict[int, Any] = {}


def expert_group() -> Any:
    """The process group of the expert all-to-alls: all ranks, but a communicator of its own.

    DDP all-reduces gradient buckets asynchronously *during* the backward pass, while the backward of the
    all-to-alls issues its own collectives; on one shared communicator the two streams can interleave in a
    different order on different ranks and deadlock. A separate group keeps each stream ordered.
    Created once per default group (a collective call: every rank must reach it).
    """
    key = id(dist.group.WORLD)
    if key not in _EXPERT_GROUPS:
        _EXPERT_GROUPS[key] = dist.new_group(backend=dist.get_backend())
    return _EXPERT_GROUPS[key]


def shard_experts(model: nn.Module, *, group: Any = None) -> nn.Module:
    """Replace every :class:`MoEFeedForward` of ``model`` (in place) by this rank's expert-parallel shard.

    Every rank must call it on an identical model (same seed). ``group`` defaults to :func:`expert_group`
    (not the default group, which DDP uses). Returns ``model``.
    """
    if group is None:
        group = expert_group()
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, MoEFeedForward) and not isinstance(m, ExpertParallelMoEFeedForward)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, ExpertParallelMoEFeedForward.from_layer(layer, group=group))
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that are sharded over ranks (DDP must ignore them)."""
    return [n for n, p in model.named_parameters() if getattr(p, "_dynaneural_expert_parallel", False)]


# ------------------------------------------------------------------------- 1-process vs W-process check
@dataclass
class EquivalenceReport:
    """One training step of a model on W ranks (experts sharded, DDP) against one process, on the same batch.

    Attributes:
        world_size: ranks of the sharded run.
        max_logit_diff / max_loss_diff / max_grad_diff / max_param_diff / max_cost_diff: largest absolute
            differences (train-mode logits, total loss, every gradient after the step, every parameter after an
            SGD step, execute-mode per-sample cost after the step).
        decisions_equal: execute-mode decisions identical after the step.
        tokens_per_s_1 / tokens_per_s_w: execute-mode tokens per second of the whole batch on 1 process and on
            W processes (median of repeats; on a machine with fewer free cores than ranks, W is not faster).
    """

    world_size: int
    max_logit_diff: float
    max_loss_diff: float
    max_grad_diff: float
    max_param_diff: float
    max_cost_diff: float
    decisions_equal: bool
    tokens_per_s_1: float
    tokens_per_s_w: float

    def ok(self, tol: float = 1e-4) -> bool:
        return self.decisions_equal and max(self.max_logit_diff, self.max_loss_diff, self.max_grad_diff,
                                            self.max_param_diff) <= tol and self.max_cost_diff == 0.0


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, loss_scale: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step; returns the train-mode logits and the loss (task mean + aux) before the step."""
    model.train()
    out = model(x, mode="train")
    loss = nn.functional.cross_entropy(out.logits, y) * loss_scale
    for v in out.aux_losses.values():
        loss = loss + v
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out.logits.detach(), loss.detach()


def _timed_execute(model: nn.Module, x: torch.Tensor, repeats: int, barrier: bool) -> float:
    import statistics
    import time

    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if barrier:
                dist.barrier()
            t0 = time.perf_counter()
            model(x, mode="execute")
            if barrier:
                dist.barrier()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _full_state(model: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) under its unsharded name, gathering expert shards from all ranks."""
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
        name = name.removeprefix("module.")
        if getattr(p, "_dynaneural_expert_parallel", False) and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t.contiguous())
            t = torch.cat(parts)
        out[name] = t.clone()
    return out


def _equivalence_worker(rank: int, world: int, store_dir: str, spec: dict[str, Any], out_dir: str) -> None:
    import datetime
    import faulthandler

    from dynaneural.engine.distributed import wrap_ddp
    from dynaneural.registry import create_model

    # If a collective ever blocks, every rank prints where it waits (stderr) before the parent gives up.
    faulthandler.dump_traceback_later(max(spec["timeout_s"] - 10.0, 5.0), exit=True)
    torch.set_num_threads(int(spec.get("threads", 1)))
    # A file store: no TCP port to pick and free, so no race with other processes for it.
    store = dist.FileStore(str(Path(store_dir) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=max(spec["timeout_s"] - 20.0, 10.0)))
    (Path(store_dir) / f"ready{rank}").touch()
    try:
        torch.manual_seed(spec["seed"])
        model = create_model(spec["model"], **spec.get("kwargs", {}))
        data = torch.load(Path(out_dir) / "batch.pt")
        x, y = data["x"].tensor_split(world)[rank], data["y"].tensor_split(world)[rank]
        shard_experts(model)
        ddp = wrap_ddp(model)
        logits, loss = _step(ddp, x, y, spec["lr"])
        grads = _full_state(model, grads=True)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(spec["lr"] * p.grad)
        params = _full_state(model, grads=False)
        model.eval()
        with torch.inference_mode():
            out = model(x, mode="execute")
        seconds = _timed_execute(model, x, spec.get("repeats", 5), barrier=True)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"logits": logits, "loss": loss, "cost": out.cost,
                                          "decisions": out.decisions, "seconds": seconds})
        if rank == 0:
            torch.save({"parts": gathered, "grads": grads, "params": params}, Path(out_dir) / "sharded.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


class RendezvousTimeout(TimeoutError):
    """The worker processes did not all join the process group in time (start-up, not a collective, hung)."""


def _spawn(fn: Any, args: tuple, nprocs: int, timeout_s: float, store_dir: str) -> None:
    """``torch.multiprocessing`` spawn of ``fn(rank, nprocs, store_dir, *args)`` that kills the workers instead of
    hanging past ``timeout_s``. Raises :class:`RendezvousTimeout` when not every rank reached the process group
    (each worker touches ``store_dir/ready{rank}`` once it has), ``TimeoutError`` when they did and then blocked."""
    import torch.multiprocessing as mp

    def ready() -> int:
        return sum((Path(store_dir) / f"ready{r}").exists() for r in range(nprocs))

    ctx = mp.start_processes(fn, args=(nprocs, store_dir, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ctx.join(timeout=1.0):
                return
        except Exception as e:  # a worker failed: say whether it was before everyone met
            if ready() < nprocs:
                raise RendezvousTimeout(f"only {ready()} of {nprocs} distributed workers joined the process group "
                                        f"before one failed: {e}") from e
            raise
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            if ready() < nprocs:
                raise RendezvousTimeout(f"only {ready()} of {nprocs} distributed workers joined the process group "
                                        f"within {timeout_s:.0f} s")
            raise TimeoutError(f"the {nprocs} distributed workers joined but did not finish within "
                               f"{timeout_s:.0f} s (their stacks are on stderr)")


def check_expert_parallel_equivalence(model: str, *, kwargs: dict[str, Any] | None = None, world_size: int = 2,
                                      batch_size: int = 8, seed: int = 0, lr: float = 0.1, repeats: int = 5,
                                      threads: int = 1, timeout_s: float = 180.0) -> EquivalenceReport:
    """Run one training step of registry model ``model`` on ``world_size`` gloo processes (experts sharded, DDP)
    and in this process unsharded, on the same batch, and compare (see :class:`EquivalenceReport`).

    The batch is split into ``world_size`` equal contiguous shards (``batch_size`` must divide evenly).
    """
    from dynaneural.contract import example_input
    from dynaneural.registry import create_model

    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by world_size {world_size}")
    kwargs = dict(kwargs or {})
    torch.manual_seed(seed)
    ref = create_model(model, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x = example_input(ref, batch_size, generator=g)
    y = torch.randint(0, ref.num_classes, (batch_size,), generator=g)
    spec = {"model": model, "kwargs": kwargs, "seed": seed, "lr": lr, "repeats": repeats, "threads": threads,
            "timeout_s": timeout_s}
    prev_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"x": x, "y": y}, Path(tmp) / "batch.pt")
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            for attempt in range(2):  # a start-up that never met is retried once, in a fresh store
                store_dir = tempfile.mkdtemp(dir=tmp)
                try:
                    _spawn(_equivalence_worker, (spec, tmp), world_size, timeout_s, store_dir)
                    break
                except RendezvousTimeout:
                    if attempt:
                        raise
                    warnings.warn("distributed workers did not meet; retrying once", RuntimeWarning, stacklevel=2)
        finally:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before
        sharded = torch.load(Path(tmp) / "sharded.pt")
    # The same step in this process: the full batch, every expert local.
    torch.set_num_threads(threads)
    try:
        logits, loss = _step(ref, x, y, lr)
        grads = _full_state(ref, grads=True)
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
        params = _full_state(ref, grads=False)
        ref.eval()
        with torch.inference_mode():
            out = ref(x, mode="execute")
        seconds_1 = _timed_execute(ref, x, repeats, barrier=False)
    finally:
        torch.set_num_threads(prev_threads)
    parts = sharded["parts"]
    logits_w = torch.cat([p["logits"] for p in parts])
    loss_w = torch.stack([p["loss"] for p in parts]).mean()
    cost_w = torch.cat([p["cost"] for p in parts])
    dec_equal = all(torch.equal(torch.cat([p["decisions"][k] for p in parts]), v) for k, v in out.decisions.items())

    def maxdiff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        if a.keys() != b.keys():
            raise AssertionError(f"parameter names differ: {sorted(set(a) ^ set(b))}")
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    tokens = batch_size * getattr(ref, "num_tokens", 1)
    return EquivalenceReport(
        world_size=world_size, max_logit_diff=float((logits_w - logits).abs().max()),
        max_loss_diff=float((loss_w - loss).abs()), max_grad_diff=maxdiff(sharded["grads"], grads),
        max_param_diff=maxdiff(sharded["params"], params), max_cost_diff=float((cost_w - out.cost).abs().max()),
        decisions_equal=dec_equal, tokens_per_s_1=tokens / seconds_1,
        tokens_per_s_w=tokens / max(p["seconds"] for p in parts))
