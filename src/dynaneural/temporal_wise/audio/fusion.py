"""Gated audio-visual fusion: per sample, a cheap gate decides which modality encoders run (audio, image or both).

Dynamic modality selection in the spirit of AdaMML (R. Panda, C.-F. R. Chen, Q. Fan, X. Sun, K. Saenko, A. Oliva,
R. Feris, "AdaMML: Adaptive Multi-Modal Learning for Efficient Video Recognition", ICCV 2021, arXiv:2105.05165),
which trains a per-sample modality policy with Gumbel-softmax and a computation loss, reduced here to one decision
per sample: a *glance* (the time-averaged spectrum and a 7×7 average-pooled image) feeds a small gate that picks
one of three options — audio only, image only, or both. Each modality has its own encoder and linear head; the
prediction is the sum of the heads of the modalities that ran (a product of experts), so a skipped modality
contributes nothing and its encoder **never runs** for that sample in execute mode.

Input: one float tensor per sample, the *packed* pair ``[spectrogram (T·F, time-major), image (S·S)]`` of shape
(T·F + S·S,) — see :func:`pack_pair` / :meth:`GatedAVFusion.unpack`.

Modes: train — both encoders for every sample, the gate relaxed with straight-through Gumbel-softmax
(``policies.categorical_decision``) and a ``BudgetLoss`` on the expected cost; simulate — both encoders for every
sample, the hard choice applied as a mask; execute — the rows that chose a modality are gathered and run through
its encoder as one sub-batch, the head outputs scattered back with ``index_add``. ``all_on()`` runs both for every
sample without the gate: the static twin (both encoders, both heads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dynaneural.calibration.thresholds import KnobCalibration, calibrate_knob
from dynaneural.compute.flops import static_flops
from dynaneural.compute.ledger import CostLedger
from dynaneural.contract import DynamicModel, resolve_mode
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput
from dynaneural.policies.budget import BudgetLoss
from dynaneural.policies.relaxations import TemperatureSchedule, categorical_decision
from dynaneural.registry import register_model
from dynaneural.temporal_wise.video.encoders import FrameEncoder
from dynaneural.validation import check_batch

__all__ = ["AUDIO", "BOTH", "IMAGE", "AudioEncoder", "FusionOutput", "GatedAVFusion", "make_audio_visual_pairs",
           "pack_pair"]

AUDIO, IMAGE, BOTH = 0, 1, 2
CHOICES = ("audio", "image", "both")


@dataclass
class FusionOutput(DynamicOutput):
    """Output of :class:`GatedAVFusion`; ``gate_prob`` (B, 3) is the gate's distribution (None under all_on)."""

    gate_prob: torch.Tensor | None = None


class AudioEncoder(nn.Module):
    """Spectrogram (N, T, F) → two stride-2 Conv1d-BN-ReLU layers over time, global average pool → (N, width)."""

    def __init__(self, n_mels: int, *, width: int = 64, kernel: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(n_mels, width, kernel, stride=2, padding=kernel // 2, bias=False), nn.BatchNorm1d(width),
            nn.ReLU(), nn.Conv1d(width, width, kernel, stride=2, padding=kernel // 2, bias=False),
            nn.BatchNorm1d(width), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.out_features = width

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.net(spec.transpose(1, 2)).flatten(1)


class _Glance(nn.Module):
    """The gate's cheap view: time-averaged spectrum (F) and a 7×7 average-pooled image, concatenated."""

    def __init__(self, frames: int, n_mels: int, size: int, *, pool: int = 7, hidden: int = 32) -> None:
        super().__init__()
        self.frames, self.n_mels, self.size = frames, n_mels, size
        self.audio_pool = nn.AdaptiveAvgPool1d(1)
        self.image_pool = nn.AdaptiveAvgPool2d(pool)
        self.mlp = nn.Sequential(nn.Linear(n_mels + pool * pool, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # packed (B, T·F + S·S) -> gate logits (B, 3)
        b, a = x.shape[0], self.frames * self.n_mels
        spec = x[:, :a].reshape(b, self.frames, self.n_mels)
        img = x[:, a:].reshape(b, 1, self.size, self.size)
        glance = torch.cat([self.audio_pool(spec.transpose(1, 2)).flatten(1), self.image_pool(img).flatten(1)], 1)
        return self.mlp(glance)


class _StaticFusion(nn.Module):
    """The static twin: both encoders and both heads for every sample (shares the dynamic model's modules)."""

    def __init__(self, model: GatedAVFusion) -> None:
        super().__init__()
        self.audio_encoder, self.image_encoder = model.audio_encoder, model.image_encoder
        self.audio_head, self.image_head = model.audio_head, model.image_head
        self._unpack = model.unpack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, img = self._unpack(x)
        return self.audio_head(self.audio_encoder(spec)) + self.image_head(self.image_encoder(img))


def pack_pair(spec: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(B, T, F) spectrograms and (B, 1, S, S) or (B, S, S) images → packed (B, T·F + S·S) model inputs."""
    if spec.shape[0] != image.shape[0]:
        raise ValueError(f"spectrograms and images must pair up: {spec.shape[0]} vs {image.shape[0]}")
    return torch.cat([spec.reshape(spec.shape[0], -1), image.reshape(image.shape[0], -1)], 1)


class GatedAVFusion(DynamicModel):
    """Gated audio-visual fusion (see the module docstring).

    Args:
        frames, n_mels: spectrogram shape (T, F). size: image height = width.
        audio_width: audio encoder channels. image_widths: image CNN channels.
        num_classes: classes.
        budget: target fraction of the both-modalities cost for the training budget loss (None = no loss).
        budget_weight: weight of that loss.
        tau: Gumbel-softmax temperature schedule (start, end), annealed over training.
    """

    def __init__(self, *, frames: int = 100, n_mels: int = 32, size: int = 28, audio_width: int = 64,
                 image_widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10, budget: float | None = 0.5,
                 budget_weight: float = 1.0, tau: tuple[float, float] = (1.0, 0.5)) -> None:
        super().__init__()
        self.frames, self.n_mels, self.size, self.num_classes = frames, n_mels, size, int(num_classes)
        self.input_shape = (frames * n_mels + size * size,)
        self.audio_encoder = AudioEncoder(n_mels, width=audio_width)
        self.image_encoder = FrameEncoder(in_chans=1, widths=image_widths)
        self.audio_head = nn.Linear(self.audio_encoder.out_features, num_classes)
        self.image_head = nn.Linear(self.image_encoder.out_features, num_classes)
        self.gate = _Glance(frames, n_mels, size)
        self.budget_loss = BudgetLoss(target=budget, weight=budget_weight) if budget is not None else None
        self.schedule = TemperatureSchedule(start=tau[0], end=tau[1], kind="exponential")
        self.tau = tau[0]
        # Added to the gate logits at inference; calibration moves the "both" entry to meet a budget.
        self.register_buffer("gate_bias", torch.zeros(3))
        self._all_on = False
        self._costs: dict[str, float] | None = None

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (B, T·F + S·S) → spectrograms (B, T, F) and images (B, 1, S, S)."""
        b, a = x.shape[0], self.frames * self.n_mels
        return x[:, :a].reshape(b, self.frames, self.n_mels), x[:, a:].reshape(b, 1, self.size, self.size)

    def set_train_progress(self, progress: float) -> None:
        self.tau = self.schedule(progress)

    def piece_flops(self) -> dict[str, float]:
        """Per-sample FLOPs of the gate, the audio path (encoder + head) and the image path."""
        if self._costs is None:
            p = next(self.parameters())
            was = self.training
            self.eval()
            try:
                x = torch.zeros(1, *self.input_shape, dtype=p.dtype, device=p.device)
                spec, img = self.unpack(x)
                self._costs = {
                    "gate": static_flops(self.gate, x),
                    "audio": static_flops(nn.Sequential(self.audio_encoder, self.audio_head), spec),
                    "image": static_flops(nn.Sequential(self.image_encoder, self.image_head), img)}
            finally:
                self.train(was)
        return self._costs

    def choice_costs(self) -> torch.Tensor:
        """(3,) float64 FLOPs of a sample choosing audio, image or both (gate included)."""
        c = self.piece_flops()
        return torch.tensor([c["gate"] + c["audio"], c["gate"] + c["image"], c["gate"] + c["audio"] + c["image"]],
                            dtype=torch.float64)

    @property
    def static_cost(self) -> float:
        c = self.piece_flops()
        return c["audio"] + c["image"]

    @contextlib.contextmanager
    def all_on(self) -> Iterator[None]:
        """Both modalities for every sample, no gate."""
        saved = self._all_on
        self._all_on = True
        try:
            yield
        finally:
            self._all_on = saved

    def to_static(self) -> nn.Module:
        return _StaticFusion(self)

    def forward(self, x: torch.Tensor, *, mode: Mode | str | None = None) -> FusionOutput:
        """Classify packed pairs (B, T·F + S·S); see the module docstring for the modes."""
        mode = resolve_mode(self, mode)
        check_batch(x, input_shape=self.input_shape)
        b = x.shape[0]
        ledger = CostLedger.zeros(b, device=x.device)
        spec, img = self.unpack(x)
        if self._all_on and mode is not Mode.TRAIN:
            ledger.charge(self.static_cost)
            choice = torch.full((b,), BOTH, dtype=torch.long, device=x.device)
            return FusionOutput(logits=self.to_static()(x), cost=ledger.flops, mode=mode,
                                decisions=self._decisions(choice))
        gate_logits = self.gate(x)
        costs = self.choice_costs().to(x.device)
        if mode is Mode.TRAIN:
            d = categorical_decision(gate_logits, training=True, relaxation="gumbel", tau=self.tau)
            use_a, use_i = d.value[:, AUDIO] + d.value[:, BOTH], d.value[:, IMAGE] + d.value[:, BOTH]
            logits = use_a[:, None] * self.audio_head(self.audio_encoder(spec)) \
                + use_i[:, None] * self.image_head(self.image_encoder(img))
            ledger.charge(self.piece_flops()["gate"] + self.static_cost)
            aux = {}
            if self.budget_loss is not None:
                aux["budget"] = self.budget_loss(d.prob @ costs.to(d.prob.dtype), float(costs[BOTH]))
            return FusionOutput(logits=logits, cost=ledger.flops, mode=mode, decisions=self._decisions(d.hard),
                                aux_losses=aux, gate_prob=d.prob)
        prob = gate_logits.softmax(-1)
        choice = (gate_logits + self.gate_bias).argmax(-1)
        ledger.charge(costs[choice])
        if mode is Mode.SIMULATE:
            use_a = (choice != IMAGE).to(x.dtype)[:, None]
            use_i = (choice != AUDIO).to(x.dtype)[:, None]
            logits = use_a * self.audio_head(self.audio_encoder(spec)) \
                + use_i * self.image_head(self.image_encoder(img))
        else:
            logits = x.new_zeros(b, self.num_classes)
            rows_a = (choice != IMAGE).nonzero().squeeze(1)
            rows_i = (choice != AUDIO).nonzero().squeeze(1)
            # Each encoder runs on the rows that chose its modality only, as one compact sub-batch.
            if rows_a.numel():
                logits.index_add_(0, rows_a, self.audio_head(self.audio_encoder(spec.index_select(0, rows_a))))
            if rows_i.numel():
                logits.index_add_(0, rows_i, self.image_head(self.image_encoder(img.index_select(0, rows_i))))
        return FusionOutput(logits=logits, cost=ledger.flops, mode=mode, decisions=self._decisions(choice),
                            gate_prob=prob)

    @staticmethod
    def _decisions(choice: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"modality": choice, "audio": choice != IMAGE, "image": choice != AUDIO}

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, *, budget: float, batch_size: int = 512) -> KnobCalibration:
        """Fit the gate's bias toward "both" so that the mean cost on ``x`` is ``budget`` × the static cost."""
        was = self.training
        self.eval()
        try:
            logits = torch.cat([self.gate(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        finally:
            self.train(was)
        costs = self.choice_costs() / self.static_cost
        base = self.gate_bias.clone()

        def mean_cost(v: float) -> float:
            bias = base.clone()
            bias[BOTH] = v
            return float(costs[(logits.cpu() + bias.cpu()).argmax(-1)].mean())

        def set_knob(v: float) -> None:
            self.gate_bias[BOTH] = v

        spread = float(logits.abs().max()) * 2 + 1.0
        return calibrate_knob(mean_cost=mean_cost, set_knob=set_knob, budget=budget, lo=-spread, hi=spread,
                              current=float(self.gate_bias[BOTH]))


def make_audio_visual_pairs(spec: torch.Tensor, spec_y: torch.Tensor, images: torch.Tensor, image_y: torch.Tensor,
                            *, seed: int, repeats: int = 1, corrupt: float = 0.5, image_noise: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair every spoken digit with an MNIST image of the same digit (deterministically, from ``seed``).

    A fraction ``corrupt`` of the pairs has one modality destroyed (half of them the image, replaced by noise;
    half the audio, replaced by noise of the features' scale), so that which modality is worth running depends on
    the sample; the label is always recoverable from the other modality.

    Returns:
        ``(x, y, corrupted)``: packed inputs (N·repeats, T·F + S·S), labels, and (N·repeats,) int64 0 = clean,
        1 = audio corrupted, 2 = image corrupted.
    """
    rng = np.random.default_rng(seed)
    by_class = {int(c): np.flatnonzero(image_y.numpy() == c) for c in range(int(image_y.max()) + 1)}
    n = spec.shape[0]
    idx_a = np.tile(np.arange(n), repeats)
    labels = spec_y.numpy()[idx_a]
    idx_i = np.array([rng.choice(by_class[int(c)]) for c in labels])
    a = spec[torch.from_numpy(idx_a)].clone()
    im = images[torch.from_numpy(idx_i)].reshape(len(idx_i), -1).clone()
    u = rng.uniform(size=len(idx_a))
    kind = np.where(u < corrupt / 2, 1, np.where(u < corrupt, 2, 0))
    gen = torch.Generator().manual_seed(int(seed))
    bad_a = torch.from_numpy(np.flatnonzero(kind == 1))
    bad_i = torch.from_numpy(np.flatnonzero(kind == 2))
    a[bad_a] = torch.randn((len(bad_a), *a.shape[1:]), generator=gen)
    im[bad_i] = torch.randn((len(bad_i), im.shape[1]), generator=gen) * image_noise + 0.5
    return pack_pair(a, im), torch.from_numpy(labels).long(), torch.from_numpy(kind).long()


@register_model
def fusion_fsdd_mnist(*, frames: int = 100, n_mels: int = 32, size: int = 28, audio_width: int = 64,
                      image_widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10,
                      budget: float | None = 0.6, budget_weight: float = 1.0) -> GatedAVFusion:
    """Spoken digit (FSDD log-mel, 100 × 32) + MNIST image (28 × 28), packed as (B, 3984)."""
    return GatedAVFusion(frames=frames, n_mels=n_mels, size=size, audio_width=audio_width,
                         image_widths=image_widths, num_classes=num_classes, budget=budget,
                         budget_weight=budget_weight)


@register_model
def test_fusion(*, budget: float | None = 0.6) -> GatedAVFusion:
    """Tiny variant for tests: spectrograms 8 × 6 and 8 × 8 images packed as (B, 112); the gate's bias is
    calibrated at init on a fixed random batch so that samples choose different modalities."""
    model = GatedAVFusion(frames=8, n_mels=6, size=8, audio_width=8, image_widths=(4, 8), num_classes=3,
                          budget=budget)
    with torch.no_grad():
        model.gate.mlp[-1].weight.mul_(10.0)  # spread the random-init gate logits across samples
    mid = float(model.choice_costs().mean()) / model.static_cost  # halfway between the cheapest and dearest choice
    model.calibrate(model.example_input(64, generator=torch.Generator().manual_seed(123)), budget=mid)
    return model
