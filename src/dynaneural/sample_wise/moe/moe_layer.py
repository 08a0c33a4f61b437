"""A token-level mixture-of-experts feed-forward layer: top-k and expert-choice routing, sorted dispatch.

Papers:
    W. Fedus, B. Zoph, N. Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
    Efficient Sparsity", JMLR 2022, arXiv:2101.03961 (top-1 routing, capacity factor, load-balancing loss).
    D. Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding",
    ICLR 2021, arXiv:2006.16668 (top-2 routing, expert capacity, first choices served before second choices).
    A. Q. Jiang et al., "Mixtral of Experts", arXiv:2401.04088 (top-2 over SwiGLU experts, weights = softmax over
    the two chosen logits).
    Y. Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022, arXiv:2202.09368.
    D. Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models",
    ACL 2024, arXiv:2401.06066 (shared experts that every token runs, beside the routed ones).
    B. Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", arXiv:2202.08906 (router
    z-loss).

Semantics (one routing, three ways of running it):

* **Routing** (shared by every mode). The router is a bias-free linear map to ``E`` logits, ``p = softmax``.
  *Top-k*: each token picks its ``k`` most probable experts; its weights are the chosen probabilities,
  renormalised to sum to one when ``normalize_weights`` (Mixtral; the default for k > 1) or the raw
  probabilities (Switch, the default for k = 1). With ``straight_through_weights`` the forward pass uses the
  renormalised weights and the backward pass the raw probabilities' gradient (Bengio et al. 2013's straight-through
  estimator): top-1 then weights its expert by exactly 1, as an upcycled dense layer needs, while the router still
  learns as in Switch. *Expert choice*: within each routing group of ``n`` tokens,
  every expert takes its ``C = round(capacity_factor · n / E)`` highest-scoring tokens, weighted by ``p``; a token
  may be taken by zero or several experts.
* **Capacity and dropped tokens** (top-k). With ``capacity_factor`` set, each expert accepts at most
  ``C = ceil(capacity_factor · n · k / E)`` assignments per routing group of ``n`` tokens. Priority follows GShard:
  every token's first choice before any second choice, and in token order within a choice. A dropped assignment
  contributes **zero** to the layer output (its weight is not redistributed to the token's other expert), so a
  token that loses all its assignments gets a zero output and, in the residual blocks of this package, passes
  through unchanged on the skip connection. ``capacity_factor=None`` is **dropless** (no token is ever dropped).
* **Routing groups.** ``group_size=None`` routes the whole call as one group; ``group_size=n`` splits the
  tokens into consecutive groups of ``n`` (the models use the sequence length, so capacity and expert choice
  are computed per sample and a sample's result does not depend on the rest of the batch).
* **Shared expert** (DeepSeekMoE's shared-expert isolation). With ``shared_hidden`` set, a dense SwiGLU of that
  width runs on every token and its output is added to the routed experts' weighted sum, unweighted, in every mode
  (it is not routed, never dropped, and is on in the static twin too). It sees every token, so it learns what all
  tokens share as fast as a dense layer does, and the routed experts are left the rest. Its FLOPs are charged to
  every token.
* **Simulate** computes every expert on every token and combines the outputs with a dense (tokens × experts)
  weight matrix: the reference. **Execute** and **train** sort the kept (token, expert) assignments by expert
  (one ``argsort`` + ``bincount``), gather the tokens once, run each expert on its contiguous slice, weight the
  results and ``index_add_`` them back: an expert never sees a token it was not given. At inference the
  expert weights are stacked ``(E, 2f, d)`` / ``(E, d, f)`` tensors multiplied with ``torch.mm(..., out=)`` on
  row blocks that keep the ``(rows, 2f)`` intermediate in the L2 cache (gate and up projections fused).

Auxiliary losses (returned, never added behind the caller's back): the Switch load-balancing loss
``E · Σ_e f_e · P_e`` (``f_e`` = share of the top-k assignments routed to ``e`` before capacity, normalised to sum
to one over experts, ``P_e`` = mean router probability; 1 at perfect balance; HF's ``load_balancing_loss_func``
equals ``k`` times this value for top-k) scaled by ``balance_coef``, and the ST-MoE router z-loss
``mean(logsumexp(logits)²)`` scaled by ``z_coef``. Expert choice is balanced by construction and only gets the
z-loss.

Cost (multiply-accumulates, the library's FLOPs convention): the router costs ``d · E`` per token and each
expert a token is processed by ``3 · d · f`` (gate, up and down projections; the SwiGLU product and the gate
weighting are element-wise and counted 0), plus ``3 · d · shared_hidden`` for the shared expert.
``MoEResult.token_flops`` holds it per token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput

__all__ = ["MoEFeedForward", "MoEResult", "MoEModelOutput", "Routing", "DenseMixtureFFN", "SwiGLU",
           "collect_moe_results", "load_balancing_loss", "router_z_loss"]

RoutingKind = Literal["top_k", "expert_choice"]


def load_balancing_loss(probs: torch.Tensor, assignment_counts: torch.Tensor, num_assignments: float | torch.Tensor
                        ) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2022, eq. 4).

    Args:
        probs: (N, E) router probabilities of the N tokens.
        assignment_counts: (E,) number of top-k assignments routed to each expert (before capacity).
        num_assignments: total assignments, N · k.
    """
    num_experts = probs.shape[-1]
    f = assignment_counts.to(probs.dtype) / num_assignments  # (E,) sums to 1; no gradient (a count)
    p = probs.mean(0)  # (E,) differentiable
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_tokens(logsumexp(logits)²)`` (Zoph et al. 2022, eq. 5): keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward layer ``W_down (silu(W_gate x) ⊙ W_up x)`` with fused gate/up weights.

    The dense baseline of the MoE benchmark (``hidden`` = k · the expert width gives the same active parameter
    count as a top-k MoE) and the building block of a single expert.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # rows [0, f): gate, [f, 2f): up
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)  # (..., 2f)
        if torch.is_grad_enabled() and h.requires_grad:
            g, u = h.chunk(2, dim=-1)
            return self.down(F.silu(g) * u)
        g = h[..., :self.hidden]
        F.silu(g, inplace=True)  # in place on the gate half: no extra (…, f) buffers at inference
        g.mul_(h[..., self.hidden:])
        return self.down(g)


@dataclass
class Routing:
    """The routing decisions of one call, with the kept assignments sorted by expert.

    Attributes:
        logits: (N, E) router logits.
        probs: (N, E) router probabilities.
        expert: (A,) expert of each kept assignment, sorted (non-decreasing).
        token: (A,) token of each kept assignment (same order).
        weight: (A,) combine weight of each kept assignment (differentiable w.r.t. the router).
        counts: kept assignments per expert, a Python list of E ints (the slice lengths).
        experts_per_token: (N,) number of experts that process each token.
        topk_index: (N, k) chosen experts of top-k routing with -1 where the assignment was dropped (None for
            expert choice).
        routed_counts: (E,) top-k assignments per expert before capacity (the load-balancing statistic).
        dropped: number of dropped top-k assignments (0 when dropless or expert choice).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    counts: list[int]
    experts_per_token: torch.Tensor
    topk_index: torch.Tensor | None = None
    routed_counts: torch.Tensor | None = None
    dropped: int = 0

    def assignment_mask(self) -> torch.Tensor:
        """(N, E) bool: token n is processed by expert e."""
        n, e = self.logits.shape
        mask = torch.zeros(n * e, dtype=torch.bool, device=self.logits.device)
        mask[self.token * e + self.expert] = True
        return mask.view(n, e)


@dataclass
class MoEResult:
    """What :class:`MoEFeedForward` returns.

    Attributes:
        output: the layer output, shaped like the input.
        router_logits: (N, E) router logits of the N = prod(leading dims) tokens.
        aux_losses: ``{"moe_balance": ..., "moe_z": ...}`` scaled by their coefficients (train/simulate mode,
            and whenever ``return_aux=True``; empty otherwise).
        token_flops: (N,) float64 FLOPs each token paid: router + the experts that processed it.
        routing: the full routing record (decisions, sorted assignments, counts).
    """

    output: torch.Tensor
    router_logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor]
    token_flops: torch.Tensor
    routing: Routing
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) tokens each expert processed."""
        return torch.tensor(self.routing.counts)


class MoEFeedForward(nn.Module):
    """Mixture of ``num_experts`` SwiGLU experts of width ``hidden`` on tokens of width ``dim``.

    Args:
        dim: token width d.
        hidden: width f of each expert's SwiGLU.
        num_experts: E.
        top_k: experts per token (top-k routing), or the average experts per token that sets the expert-choice
            capacity when ``capacity_factor`` is None.
        routing: ``"top_k"`` or ``"expert_choice"``.
        capacity_factor: top-k: expert capacity ``ceil(cf · n · k / E)`` per group of n tokens (None =
            dropless). Expert choice: tokens per expert ``round(cf · n / E)`` (None = ``top_k``).
        group_size: tokens per routing group (None = the whole call is one group).
        normalize_weights: renormalise the top-k weights to sum to one (default: True for k > 1).
        straight_through_weights: forward the renormalised top-k weights, backward the raw probabilities' gradient
            (top-k routing only; see the module docstring).
        shared_hidden: width of a shared SwiGLU expert that every token runs (DeepSeekMoE; None = none).
        router_jitter: Switch multiplicative jitter on the router input in train mode (0 = off).
        balance_coef: weight of the load-balancing loss (Switch: 1e-2).
        z_coef: weight of the router z-loss (ST-MoE: 1e-3).
        row_block: rows per matrix product and per intra-op thread at inference (a block of
            ``row_block · threads`` rows keeps the (rows, 2f) intermediate in cache while giving each thread a
            useful share; None = a whole expert slice at once).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, *, top_k: int = 2, routing: RoutingKind = "top_k",
                 capacity_factor: float | None = None, group_size: int | None = None,
                 normalize_weights: bool | None = None, straight_through_weights: bool = False,
                 shared_hidden: int | None = None, router_jitter: float = 0.0, balance_coef: float = 1e-2,
                 z_coef: float = 1e-3, row_block: int | None = 256) -> None:
        super().__init__()
        if routing not in ("top_k", "expert_choice"):
            raise ValueError(f"routing must be 'top_k' or 'expert_choice', got {routing!r}")
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError("dim, hidden and num_experts must be positive")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive (or None for dropless), got {capacity_factor}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if row_block is not None and row_block < 1:
            raise ValueError(f"row_block must be positive, got {row_block}")
        if shared_hidden is not None and (isinstance(shared_hidden, bool) or shared_hidden < 1):
            raise ValueError(f"shared_hidden must be a positive width (or None for no shared expert), got "
                             f"{shared_hidden!r}")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.routing, self.capacity_factor, self.group_size = routing, capacity_factor, group_size
        self.normalize_weights = top_k > 1 if normalize_weights is None else bool(normalize_weights)
        if straight_through_weights and routing != "top_k":
            raise ValueError("straight_through_weights applies to top-k routing")
        self.straight_through_weights = bool(straight_through_weights)
        self.router_jitter, self.balance_coef, self.z_coef = float(router_jitter), float(balance_coef), float(z_coef)
        self.row_block = row_block
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.shared_hidden = None if shared_hidden is None else int(shared_hidden)
        # Dense, so replicated like the router (never sharded under expert parallelism).
        self.shared: SwiGLU | None = SwiGLU(dim, self.shared_hidden) if self.shared_hidden else None
        # Stacked expert weights in nn.Linear's (out, in) layout: one parameter each, sliced per expert.
        self.w_gate_up = nn.Parameter(torch.empty(self.num_local_experts, 2 * hidden, dim))
        self.w_down = nn.Parameter(torch.empty(self.num_local_experts, dim, hidden))
        self._all_on = False
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------------- set-up
    @property
    def num_local_experts(self) -> int:
        """Experts whose weights this module holds (all of them here; a shard under expert parallelism)."""
        return self.num_experts

    def reset_parameters(self) -> None:
        # nn.Linear's default init, expert by expert (fan_in = d for gate/up, f for down).
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for w in (self.w_gate_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.shared is not None:
            self.shared.gate_up.reset_parameters()
            self.shared.down.reset_parameters()

    def expert_flops(self) -> int:
        """FLOPs of one expert on one token: gate, up and down projections."""
        return 3 * self.dim * self.hidden

    def router_flops(self) -> int:
        return self.dim * self.num_experts

    def shared_flops(self) -> int:
        """FLOPs of the shared expert on one token (0 without one)."""
        return 3 * self.dim * self.shared_hidden if self.shared_hidden else 0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, experts={self.num_experts}, top_k={self.top_k}, "
                f"routing={self.routing}, capacity_factor={self.capacity_factor}, group_size={self.group_size}, "
                f"shared_hidden={self.shared_hidden}")

    def set_all_on(self, on: bool) -> None:
        """Every expert for every token (top-k = E, dropless; expert choice with C = n): the dense mixture."""
        self._all_on = bool(on)

    # ---------------------------------------------------------------------------------------------- routing
    def route(self, x: torch.Tensor, *, mode: Mode = Mode.EXECUTE) -> Routing:
        """Route the (N, d) tokens ``x``; see the module docstring for the rules."""
        n = x.shape[0]
        xr = x
        if mode is Mode.TRAIN and self.router_jitter > 0:
            xr = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        logits = self.router(xr)  # (N, E)
        probs = logits.float().softmax(-1)  # router in float32 whatever the activations' dtype
        g = self.group_size or n
        if n % g:
            raise ValueError(f"{n} tokens do not split into routing groups of {g}")
        if self.routing == "expert_choice":
            return self._route_expert_choice(logits, probs, g)
        return self._route_top_k(logits, probs, g)

    def _route_top_k(self, logits: torch.Tensor, probs: torch.Tensor, g: int) -> Routing:
        n, e = probs.shape
        k = e if self._all_on else self.top_k
        w, idx = probs.topk(k, dim=-1)  # (N, k) each, best first
        if self.straight_through_weights and not self._all_on:
            w = (w / w.sum(-1, keepdim=True)).detach() + w - w.detach()
        elif self.normalize_weights or self._all_on:
            w = w / w.sum(-1, keepdim=True)
        flat_e = idx.reshape(-1)  # (N·k,) token-major: assignment a = n·k + j
        routed = torch.bincount(flat_e, minlength=e)
        cap = None if (self.capacity_factor is None or self._all_on) else math.ceil(self.capacity_factor * g * k / e)
        if cap is None or cap >= g:  # an expert can never get more than g assignments of a group of g tokens
            order = torch.argsort(flat_e, stable=True)
            counts = routed
            kept = None
        else:
            # One stable sort by (expert, group, choice j); token order is kept inside each key, so the rank of
            # an assignment inside its (expert, group) segment is its GShard priority: first choices first.
            groups = n // g
            a = torch.arange(n * k, device=flat_e.device)
            key = (flat_e * groups + a // (k * g)) * k + a % k
            order = torch.argsort(key, stable=True)
            seg = key.index_select(0, order) // k  # (A,) expert · groups + group, non-decreasing
            seg_counts = torch.bincount(seg, minlength=e * groups)
            start = torch.cumsum(seg_counts, 0) - seg_counts
            rank = torch.arange(order.numel(), device=order.device) - start.index_select(0, seg)
            keep = rank < cap
            order = order[keep]
            kept = torch.zeros(n * k, dtype=torch.bool, device=flat_e.device)
            kept[order] = True
            counts = torch.bincount(flat_e.index_select(0, order), minlength=e)
        token = torch.div(order, k, rounding_mode="floor")
        expert = flat_e.index_select(0, order)
        weight = w.reshape(-1).index_select(0, order)
        if kept is None:
            experts_per_token = torch.full((n,), k, dtype=torch.long, device=probs.device)
            topk_index = idx
            dropped = 0
        else:
            kept = kept.view(n, k)
            experts_per_token = kept.sum(1)
            topk_index = idx.masked_fill(~kept, -1)
            dropped = n * k - int(order.numel())
        return Routing(logits=logits, probs=probs, expert=expert, token=token, weight=weight,
                       counts=counts.tolist(), experts_per_token=experts_per_token, topk_index=topk_index,
                       routed_counts=routed, dropped=dropped)

    def _route_expert_choice(self, logits: torch.Tensor, probs: torch.Tensor, g: int) -> Routing:
        n, e = probs.shape
        groups = n // g
        if self._all_on:
            c = g
        else:
            cf = self.top_k if self.capacity_factor is None else self.capacity_factor
            c = min(g, max(1, round(cf * g / e)))
        scores = probs.view(groups, g, e).transpose(1, 2)  # (G, E, g)
        w, pos = scores.topk(c, dim=-1)  # (G, E, C): each expert's C best tokens in each group
        base = (torch.arange(groups, device=pos.device) * g).view(groups, 1, 1)
        token = (pos + base).permute(1, 0, 2).reshape(-1)  # (E·G·C,) already grouped by expert
        weight = w.permute(1, 0, 2).reshape(-1)
        expert = torch.arange(e, device=pos.device).repeat_interleave(groups * c)
        experts_per_token = torch.bincount(token, minlength=n)
        return Routing(logits=logits, probs=probs, expert=expert, token=token, weight=weight,
                       counts=[groups * c] * e, experts_per_token=experts_per_token)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str = Mode.EXECUTE, return_aux: bool | None = None
                ) -> MoEResult:
        """Run the layer on ``x`` (..., d); returns a :class:`MoEResult` (output shaped like ``x``)."""
        mode = Mode.parse(mode)
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE layer expects tokens of width {self.dim}, got shape {tuple(x.shape)}")
        shape = x.shape
        x2 = x.reshape(-1, self.dim)  # (N, d)
        if x2.shape[0] == 0:
            raise ValueError("MoE layer got an empty batch of tokens")
        r = self.route(x2, mode=mode)
        if mode is Mode.SIMULATE:
            y = self._simulate(x2, r)
        else:
            y = self._dispatch(x2, r)
        token_flops = (self.router_flops() + self.shared_flops()
                       + r.experts_per_token.to(torch.float64) * self.expert_flops())
        aux: dict[str, torch.Tensor] = {}
        if return_aux or (return_aux is None and mode is not Mode.EXECUTE):
            aux = self.aux_losses(r)
        return MoEResult(output=y.view(shape), router_logits=r.logits, aux_losses=aux, token_flops=token_flops,
                         routing=r)

    def aux_losses(self, r: Routing) -> dict[str, torch.Tensor]:
        """The scaled load-balancing (top-k only) and z-losses of one routing."""
        out = {"moe_z": self.z_coef * router_z_loss(r.logits)}
        if r.routed_counts is not None:
            counts, prob_sum, n = self._global_stats(r.routed_counts, r.probs.sum(0), r.probs.shape[0])
            k = self.num_experts if self._all_on else self.top_k
            e = self.num_experts
            out["moe_balance"] = self.balance_coef * e * ((counts.to(prob_sum.dtype) / (n * k)) * (prob_sum / n)).sum()
        return out

    def _global_stats(self, counts: torch.Tensor, prob_sum: torch.Tensor, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Routing statistics over every token of the step (expert parallelism sums them over ranks)."""
        return counts, prob_sum, n

    def _simulate(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Reference: every expert on every token, combined with a dense (N, E) weight matrix."""
        n, e = x.shape[0], self.num_experts
        h = torch.matmul(x.unsqueeze(0), self.w_gate_up.transpose(1, 2))  # (E, N, 2f)
        gate, up = h.chunk(2, dim=-1)
        y_all = torch.matmul(F.silu(gate) * up, self.w_down.transpose(1, 2))  # (E, N, d)
        combine = torch.zeros(n * e, dtype=r.weight.dtype, device=x.device)
        combine = combine.index_put((r.token * e + r.expert,), r.weight).view(n, e)  # 0 where not assigned
        y = torch.einsum("ne,end->nd", combine.to(y_all.dtype), y_all)
        return y if self.shared is None else y + self.shared(x)

    def _dispatch(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Sorted dispatch: gather the assigned tokens once, experts on contiguous slices, weight, scatter-add."""
        xs = x.index_select(0, r.token)  # (A, d), grouped by expert
        ys = self._run_experts(xs, r.counts)  # (A, d), same order
        w = r.weight.to(ys.dtype).unsqueeze(1)
        out = torch.zeros_like(x) if self.shared is None else self.shared(x)  # the routed sum is added onto it
        if torch.is_grad_enabled() and (ys.requires_grad or w.requires_grad or out.requires_grad):
            return out.index_add(0, r.token, ys * w)
        return out.index_add_(0, r.token, ys.mul_(w))

    def _run_experts(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e on rows [sum(counts[:e]), sum(counts[:e+1])) of ``xs``; counts are per local expert."""
        if torch.is_grad_enabled() and (xs.requires_grad or self.w_gate_up.requires_grad):
            return self._run_experts_autograd(xs, counts)
        return self._run_experts_inference(xs, counts)

    def _run_experts_autograd(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # unbind: one stack in backward instead of a full-size zero gradient per indexed expert.
        w_gu, w_dn = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        outs = []
        for e, xe in enumerate(xs.split(counts)):
            if xe.shape[0] == 0:
                continue
            gate, up = F.linear(xe, w_gu[e]).chunk(2, dim=-1)  # (n_e, f) each
            outs.append(F.linear(F.silu(gate) * up, w_dn[e]))  # (n_e, d)
        if not outs:
            return xs.new_zeros(0, self.dim) + 0 * self.w_down.sum()
        return torch.cat(outs)

    def _run_experts_inference(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ys = torch.empty(xs.shape[0], self.dim, dtype=xs.dtype, device=xs.device)
        f = self.hidden
        block = self.row_block * torch.get_num_threads() if self.row_block else max(counts, default=1)
        buf = torch.empty(min(block, max(max(counts, default=1), 1)), 2 * f, dtype=xs.dtype, device=xs.device)
        start = 0
        for e, c in enumerate(counts):
            w_gu, w_dn = self.w_gate_up[e].t(), self.w_down[e].t()  # (d, 2f), (f, d) views
            end = start + c
            while start < end:
                m = min(block, end - start)
                h = torch.mm(xs[start:start + m], w_gu, out=buf[:m])  # (m, 2f), in cache
                g = h[:, :f]
                F.silu(g, inplace=True)
                g.mul_(h[:, f:])
                torch.mm(g, w_dn, out=ys[start:start + m])  # straight into the sorted output
                start += m
        return ys

    def flops(self, inputs: tuple, output: MoEResult) -> float:
        """Whole-call FLOPs for :func:`~dynaneural.compute.flops.count_flops`: what the routed tokens ran."""
        return float(output.token_flops.sum())


class DenseMixtureFFN(nn.Module):
    """The static twin of a :class:`MoEFeedForward`: every expert on every token, weighted by the full softmax.

    It is what the MoE layer computes with every decision on (top-k = E renormalised, or expert choice with
    capacity n, both reduce to ``Σ_e p_e(x) · expert_e(x)``). It shares the layer's weights.
    """

    def __init__(self, moe: MoEFeedForward) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        shape = x.shape
        x2 = x.reshape(-1, m.dim)
        probs = m.router(x2).float().softmax(-1)  # (N, E)
        h = torch.matmul(x2.unsqueeze(0), m.w_gate_up.transpose(1, 2))  # (E, N, 2f)
        gate, up = h.chunk(2, dim=-1)
        y_all = torch.matmul(F.silu(gate) * up, m.w_down.transpose(1, 2))  # (E, N, d)
        y = torch.einsum("ne,end->nd", probs.to(y_all.dtype), y_all)
        if m.shared is not None:
            y = y + m.shared(x2)
        return y.view(shape)

    def flops(self, inputs: tuple, output: torch.Tensor) -> float:
        m = self.moe
        tokens = output.numel() // m.dim
        return float(tokens * (m.router_flops() + m.shared_flops() + m.num_experts * m.expert_flops()))


@dataclass
class MoEModelOutput(DynamicOutput):
    """Output of a model built from :class:`MoEFeedForward` layers.

    Attributes:
        router_logits: per MoE layer, (B, T, E) router logits (T = tokens per sample; 1 for the MLP).
        tokens_per_expert: (L, E) assignments each expert of each layer processed in this call.
    """

    router_logits: list[torch.Tensor] = field(default_factory=list)
    tokens_per_expert: torch.Tensor | None = None


def collect_moe_results(results: list[MoEResult], batch_size: int
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor],
                                   torch.Tensor]:
    """Per-sample decisions, summed aux losses, per-sample MoE FLOPs, router logits and expert counts of a stack.

    Every layer's tokens are ``batch_size`` samples of equal token counts (a layer's count may differ from another's,
    e.g. the feature maps of a CNN at two resolutions).

    Decisions per layer ``l``: ``moe{l}/experts`` (B, T·k) chosen experts with -1 for dropped assignments (top-k)
    or ``moe{l}/assigned`` (B, T·E) bool token-expert assignments (expert choice); ``moe_dropped`` (B,) dropped
    assignments per sample over all layers.
    """
    decisions: dict[str, torch.Tensor] = {}
    aux: dict[str, torch.Tensor] = {}
    flops = torch.zeros(batch_size, dtype=torch.float64, device=results[0].token_flops.device)
    dropped = torch.zeros(batch_size, dtype=torch.long, device=flops.device)
    logits, counts = [], []
    for i, res in enumerate(results):
        r = res.routing
        if r.topk_index is not None:
            decisions[f"moe{i}/experts"] = r.topk_index.reshape(batch_size, -1)
            dropped += (r.topk_index < 0).view(batch_size, -1).sum(1)
        else:
            decisions[f"moe{i}/assigned"] = r.assignment_mask().view(batch_size, -1)
        for k, v in res.aux_losses.items():
            aux[k] = aux[k] + v if k in aux else v
        flops += res.token_flops.view(batch_size, -1).sum(1)
        logits.append(res.router_logits.view(batch_size, -1, res.router_logits.shape[-1]))
        counts.append(torch.tensor(r.counts))
    decisions["moe_dropped"] = dropped
    return decisions, aux, flops, logits, torch.stack(counts)


class MoEStackMixin:
    """What every model built from a stack of :class:`MoEFeedForward` layers shares: the all-experts-on context
    (the dense softmax mixture, the static twin's behaviour) and the assembly of the model output. The model
    defines ``moe_layers()`` and ``_dense_flops`` (per-sample FLOPs of everything but the MoE layers)."""

    _dense_flops: float

    def moe_layers(self) -> list[MoEFeedForward]:  # pragma: no cover - interface
        raise NotImplementedError

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        for m in self.moe_layers():
            m.set_all_on(True)
        try:
            yield
        finally:
            for m in self.moe_layers():
                m.set_all_on(False)

    def _count_dense_flops(self) -> float:
        """Per-sample FLOPs of everything but the MoE layers: the static twin's (counted from its layers) minus its
        dense mixtures, each over its layer's routing group (a sample's tokens)."""
        from dynaneural.compute.flops import static_flops

        twin = self.to_static()  # type: ignore[attr-defined]
        x = self.example_input(1, generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
        mix = sum((m.group_size or 1) * (m.router_flops() + m.shared_flops() + m.num_experts * m.expert_flops())
                  for m in self.moe_layers())
        return static_flops(twin, x) - mix

    def _moe_output(self, results: list[MoEResult], logits: torch.Tensor, *, batch_size: int, mode: Mode
                    ) -> MoEModelOutput:
        decisions, aux, moe_flops, router_logits, counts = collect_moe_results(results, batch_size)
        ledger = CostLedger.zeros(batch_size, device=logits.device)
        ledger.charge(self._dense_flops, part="dense")
        ledger.charge(moe_flops, part="moe")
        return MoEModelOutput(logits=logits, cost=ledger.flops, decisions=decisions, mode=mode, aux_losses=aux,
                              router_logits=router_logits, tokens_per_expert=counts)
