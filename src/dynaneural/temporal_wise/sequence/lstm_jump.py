"""LSTM-Jump: learning to skim text by reading R tokens, then jumping ahead (policy trained with REINFORCE).

Paper: A. W. Yu, H. Lee, Q. V. Le, "Learning to Skim Text", ACL 2017, arXiv:1704.06877.

A sample reads ``R`` tokens with an LSTM; then a jump softmax over ``K + 1`` choices reads its state: ``0`` stops
reading, ``a ≥ 1`` skips the next ``a`` tokens. Reading resumes after the jump and stops at the end of the
sequence, on a ``0``, or at the first decision point after ``N`` jumps (the paper's three stopping conditions).
The class is predicted from the last state. The jump policy is trained with REINFORCE
(:class:`~dynaneural.policies.ReinforceLoss`, reward +1 for a right and −1 for a wrong prediction as in the paper,
moving-average baseline, entropy bonus): :meth:`LSTMJump.loss` adds it to the cross-entropy.

Modes: ``train`` samples jumps (:func:`~dynaneural.policies.sample_categorical`) and runs every sample at every read
iteration, masked; ``simulate`` does the same with greedy jumps; ``execute`` keeps only the samples still reading
in a compact batch (one iteration = one token per sample, gathered at each sample's own position), evaluates the
policy only for those at a decision point, and drops samples from the batch as they stop — skipped tokens are
never embedded nor read. Ledger parts: ``cell`` (tokens read × cell MACs), ``policy`` (decisions × H(K+1)),
``head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies import PolicySample, ReinforceLoss, sample_categorical
from dynaneural.registry import register_model
from dynaneural.temporal_wise.sequence.common import (
    RecurrentBackbone,
    SequenceModel,
    check_sequence_batch,
)

__all__ = ["LSTMJump", "LSTMJumpConfig", "LSTMJumpOutput"]


@dataclass(frozen=True)
class LSTMJumpConfig:
    """Args:
    hidden_size: LSTM state size. num_classes: classes. vocab_size / embed_dim: token inputs; input_size: features.
    max_len: example length. read: R, tokens read between decisions. max_jump: K, the longest jump.
    max_jumps: N, jumps allowed per sample. entropy_coef: REINFORCE entropy bonus.
    stop_bias: initial bias of the "stop" logit (negative: start by reading on).
    """

    hidden_size: int = 128
    num_classes: int = 2
    vocab_size: int | None = None
    embed_dim: int = 64
    input_size: int | None = None
    max_len: int = 48
    read: int = 3
    max_jump: int = 3
    max_jumps: int = 8
    entropy_coef: float = 0.01
    stop_bias: float = -2.0

    def __post_init__(self) -> None:
        if self.read < 1 or self.max_jump < 1 or self.max_jumps < 0:
            raise ValueError(f"read and max_jump must be >= 1 and max_jumps >= 0, got R={self.read}, "
                             f"K={self.max_jump}, N={self.max_jumps}")


@dataclass
class LSTMJumpOutput(DynamicOutput):
    """``decisions``: ``read`` (B, T) bool (tokens read), ``jumps`` (B,) number of jumps.

    Attributes:
        policy_log_prob: (B,) summed log-probability of the jump actions taken (train/simulate).
        policy_entropy: (B,) summed entropy of the jump softmax at the decisions taken (train/simulate).
    """

    policy_log_prob: torch.Tensor | None = None
    policy_entropy: torch.Tensor | None = None


class LSTMJump(SequenceModel):
    """LSTM-Jump classifier over token ids (B, T) or features (B, T, F); see the module docstring."""

    def __init__(self, cfg: LSTMJumpConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = RecurrentBackbone(cell="lstm", hidden_size=cfg.hidden_size, num_classes=cfg.num_classes,
                                          vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
                                          input_size=cfg.input_size)
        self.policy = nn.Linear(cfg.hidden_size, cfg.max_jump + 1)  # 0 = stop, a = skip a tokens
        with torch.no_grad():
            self.policy.bias[0] = cfg.stop_bias
        self.reinforce = ReinforceLoss(baseline="moving_average", entropy_coef=cfg.entropy_coef)
        self.num_classes = cfg.num_classes
        self._init_sequence_io(vocab_size=cfg.vocab_size, input_size=cfg.input_size, max_len=cfg.max_len)

    def loss(self, out: LSTMJumpOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy + REINFORCE of the jumps (reward +1 right, −1 wrong): a ``loss_fn`` for the trainer."""
        ce = F.cross_entropy(out.logits, y)
        parts = {"loss": ce, "ce": ce.detach()}
        if out.policy_log_prob is not None and out.policy_log_prob.requires_grad:
            reward = (out.logits.argmax(-1) == y).to(out.logits.dtype) * 2 - 1
            rl = self.reinforce(PolicySample(actions=torch.empty(0), log_prob=out.policy_log_prob,
                                             entropy=out.policy_entropy), reward)  # type: ignore[arg-type]
            parts["loss"] = ce + rl["loss"]
            parts["policy_loss"] = rl["policy_loss"]
        return parts

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> LSTMJumpOutput:
        mode = resolve_mode(self, mode)
        x = check_sequence_batch(self, x)
        bb = self.backbone
        if self._all_on:  # read every token: the static network
            _, (h, _) = bb.run_fused(bb.features(x))
            read = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            jumps = n_policy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            logp = ent = None
        elif mode is Mode.EXECUTE:
            h, read, jumps, n_policy = self._execute(x)
            logp = ent = None
        else:
            h, read, jumps, n_policy, logp, ent = self._dense(x, sample=mode is Mode.TRAIN)
        ledger = CostLedger.zeros(x.shape[0], device=x.device, track_parts=True)
        ledger.charge(read.sum(1).to(torch.float64) * bb.step_flops, part="cell")
        ledger.charge(n_policy.to(torch.float64) * self.policy.in_features * self.policy.out_features, part="policy")
        ledger.charge(float(bb.head_flops), part="head")
        return LSTMJumpOutput(logits=bb.head(h), cost=ledger.flops, decisions={"read": read, "jumps": jumps},
                              mode=mode, cost_by_part=ledger.by_part, policy_log_prob=logp, policy_entropy=ent)

    def _token(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Features of token ``pos[i]`` of sample ``rows[i]`` only: (n, F)."""
        xt = x[rows, pos]
        return self.backbone.embed(xt) if self.backbone.embed is not None else xt

    def _dense(self, x: torch.Tensor, *, sample: bool):  # noqa: ANN202 - tuple of six
        """Train/simulate: every sample through every read iteration; the stopped ones are masked."""
        cfg, bb = self.config, self.backbone
        b, steps = x.shape[:2]
        dev = x.device
        rows = torch.arange(b, device=dev)
        pos = torch.zeros(b, dtype=torch.long, device=dev)
        since = torch.zeros_like(pos)
        jumps = torch.zeros_like(pos)
        n_policy = torch.zeros_like(pos)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        read = torch.zeros(b, steps, dtype=torch.bool, device=dev)
        w = bb.head.weight
        h, c = bb.zero_state(b, w)
        logp = torch.zeros(b, dtype=w.dtype, device=dev)
        ent = torch.zeros(b, dtype=w.dtype, device=dev)
        while bool(active.any()):
            hn, cn = bb.step(self._token(x, rows, pos.clamp(max=steps - 1)), (h, c))
            a1 = active.unsqueeze(1)
            h, c = torch.where(a1, hn, h), torch.where(a1, cn, c)
            read[rows[active], pos[active]] = True
            pos = torch.where(active, pos + 1, pos)
            since = torch.where(active, since + 1, since)
            stop = active & (pos >= steps)
            decide = active & ~stop & (since == cfg.read)
            forced = decide & (jumps >= cfg.max_jumps)
            choose = decide & ~forced
            stop = stop | forced
            if bool(choose.any()):
                logits = self.policy(h)  # (B, K+1); only the ``choose`` rows count
                ps = sample_categorical(logits, greedy=not sample)
                a = ps.actions
                logp = logp + torch.where(choose, ps.log_prob, torch.zeros_like(ps.log_prob))
                ent = ent + torch.where(choose, ps.entropy, torch.zeros_like(ps.entropy))
                n_policy = n_policy + choose.long()
                stop = stop | (choose & (a == 0))
                jump = choose & (a > 0)
                pos = torch.where(jump, pos + a, pos)
                jumps = jumps + jump.long()
                since = torch.where(jump, torch.zeros_like(since), since)
                stop = stop | (jump & (pos >= steps))
            active = active & ~stop
        return h, read, jumps, n_policy, logp, ent

    def _execute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Execute: a compact batch of the samples still reading; they leave it as they stop."""
        cfg, bb = self.config, self.backbone
        b, steps = x.shape[:2]
        dev = x.device
        w = bb.head.weight
        h_final = torch.zeros(b, bb.hidden_size, dtype=w.dtype, device=dev)
        read = torch.zeros(b, steps, dtype=torch.bool, device=dev)
        jumps_out = torch.zeros(b, dtype=torch.long, device=dev)
        n_policy = torch.zeros(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)  # original index of each compact row
        pos = torch.zeros(b, dtype=torch.long, device=dev)
        since = torch.zeros_like(pos)
        jumps = torch.zeros_like(pos)
        h, c = bb.zero_state(b, w)
        while rows.numel():
            h, c = bb.step(self._token(x, rows, pos), (h, c))
            read[rows, pos] = True
            pos = pos + 1
            since = since + 1
            stop = pos >= steps
            decide = ~stop & (since == cfg.read)
            if bool(decide.any()):
                di = decide.nonzero().squeeze(1)
                allowed = jumps.index_select(0, di) < cfg.max_jumps
                stop[di[~allowed]] = True
                pi = di[allowed]
                if pi.numel():
                    a = self.policy(h.index_select(0, pi)).argmax(-1)  # policy only for rows at a decision
                    n_policy.index_add_(0, rows.index_select(0, pi), torch.ones_like(pi))
                    stop[pi[a == 0]] = True
                    jp, ja = pi[a > 0], a[a > 0]
                    pos[jp] += ja
                    jumps[jp] += 1
                    since[jp] = 0
                    stop[jp[pos.index_select(0, jp) >= steps]] = True
            if bool(stop.any()):
                si = stop.nonzero().squeeze(1)
                h_final.index_copy_(0, rows.index_select(0, si), h.index_select(0, si))
                jumps_out.index_copy_(0, rows.index_select(0, si), jumps.index_select(0, si))
                keep = (~stop).nonzero().squeeze(1)  # the samples still reading form the next compact batch
                rows, pos, since, jumps = (t.index_select(0, keep) for t in (rows, pos, since, jumps))
                h, c = h.index_select(0, keep), c.index_select(0, keep)
        return h_final, read, jumps_out, n_policy


def _build(defaults: dict, overrides: dict) -> LSTMJump:
    return LSTMJump(LSTMJumpConfig(**{**defaults, **overrides}))


@register_model
def lstm_jump_sst2(*, vocab_size: int = 16384, hidden_size: int = 128, embed_dim: int = 128, max_len: int = 48,
                   read: int = 3, max_jump: int = 3, max_jumps: int = 8, entropy_coef: float = 0.01) -> LSTMJump:
    """LSTM-Jump over SST-2 token ids."""
    return _build(dict(num_classes=2), dict(vocab_size=vocab_size, hidden_size=hidden_size, embed_dim=embed_dim,
                                            max_len=max_len, read=read, max_jump=max_jump, max_jumps=max_jumps,
                                            entropy_coef=entropy_coef))


@register_model
def test_lstm_jump() -> LSTMJump:
    """Tiny LSTM-Jump on token ids; stop bias 0 and scaled policy weights so samples jump differently."""
    m = _build({}, dict(vocab_size=40, embed_dim=8, hidden_size=16, num_classes=3, max_len=16, read=2, max_jump=3,
                        max_jumps=3, stop_bias=-1.0))
    with torch.no_grad():
        m.policy.weight.mul_(6.0)
    return m
