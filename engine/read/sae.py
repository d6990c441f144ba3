"""A small sparse autoencoder trained from a store: TopK or ReLU + L1, with the usual practice, and its
evaluation. ``examples/train_sae.py`` and ``benchmarks/training.py`` train this one.

The practice (as in SAELens and Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

- Inputs are multiplied by a normalization factor, ``sqrt(d / mean ||x||^2)`` (the store's statistics:
  ``norm_scaling_factor``), so a row's mean squared norm is its width whatever the layer's scale.
- The decoder's directions (rows of ``W_dec``, SAELens' convention) have unit norm: after each step they are
  renormalized, and before it the gradient's component parallel to each is removed (Adam then moves along the
  sphere). With unit directions a latent's activation is its contribution's norm, so L1 and TopK compare
  latents fairly.
- ``W_enc`` starts as ``W_dec``'s transpose (random unit directions), ``b_enc`` at zero, ``b_dec`` at the
  data's mean (scaled), which the encoder subtracts first.
- Adam, seeded initialization: the same seed and batches give the same SAE.

Evaluation over held-out rows (``evaluate``): FVU, the fraction of variance unexplained, is the summed
squared error over the summed squared deviation from those rows' own mean (scale-free, so computed in the
scaled space); L0 is the mean count of non-zero latents per row; a latent is dead when it fires on none of
the rows. The trainer also counts latents dead in training: none of the last ``dead_window`` training rows
fired them (every row seen, when fewer were).

Saved in SAELens' layout (``SAE.load_from_disk(folder)``: ``cfg.json`` and ``sae_weights.safetensors`` with
``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``), architecture ``topk`` or
``standard``, with the normalization factor folded into the weights as SAELens' own trainer does at the end
(``fold_activation_norm_scaling_factor``): the saved SAE takes the store's rows as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from engine.errors import ConfigError
from engine.read.reader import CaptureStore, open_store

ARCHITECTURES = ("topk", "relu")
# SAELens' name for each architecture in cfg.json ("standard" is its ReLU SAE trained with an L1 penalty).
SAELENS_ARCHITECTURES = {"topk": "topk", "relu": "standard"}
# The cfg.json layout written here is SAELens 6's (metadata nested, architecture by name); older versions
# trigger its pre-6 conversion on load.
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"


@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """The SAE's shape and how it trains. Validated on construction.

    Args:
        d_in: the activations' width.
        d_sae: latents (``expansion factor x d_in``).
        architecture: ``topk`` (the ``k`` largest pre-activations kept, then ReLU; loss: squared error) or
            ``relu`` (ReLU; loss: squared error + ``l1_coefficient`` x the latents' L1 norm).
        k: latents kept per row (topk).
        l1_coefficient: weight of the L1 penalty (relu), against the squared error summed over a row of the
            normalized activations (whose mean squared norm is ``d_in``).
        lr: Adam's learning rate.
        seed: seeds the initialization.
        dead_window: training rows over which a latent that never fired counts as dead in training.

    Thread safety: immutable.
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    l1_coefficient: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    dead_window: int = 100_000

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r}: choose {' or '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae", "k", "dead_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.architecture == "topk" and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} is more than the {self.d_sae} latents: lower k or raise d_sae")
        if not self.lr > 0 or not self.l1_coefficient >= 0:
            raise ConfigError(f"lr must be > 0 and l1_coefficient >= 0, got {self.lr}, {self.l1_coefficient}")


@dataclasses.dataclass(frozen=True)
class Normalization:
    """What inputs are scaled by, and the mean ``b_dec`` starts at (unscaled).

    Attributes:
        scaling_factor: ``sqrt(d / mean ||x||^2)``.
        mean: the rows' mean vector.
        source: where they come from, for reports.

    Thread safety: immutable (do not change ``mean`` in place).
    """

    scaling_factor: float
    mean: torch.Tensor
    source: str

    @classmethod
    def of_store(cls, store: str | os.PathLike | CaptureStore, key: str) -> Normalization:
        """From the manifest statistics (over the rows readers see by default).

        Raises:
            ConfigError: the store has no statistics for ``key`` (captured with ``statistics=False``).
        """
        opened = store if isinstance(store, CaptureStore) else open_store(store)
        entry = opened.manifest.statistics.get(key, {})
        if not entry.get("norm_scaling_factor"):
            raise ConfigError(f"{opened.path} has no statistics for {key}: compute them from rows with "
                              "Normalization.of_rows(rows)")
        return cls(float(entry["norm_scaling_factor"]), torch.tensor(entry["mean"], dtype=torch.float32),
                   f"store statistics ({entry['count']:,} rows)")

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> Normalization:
        """From rows in memory (``(n, d)``), in float64."""
        rows = rows.double()
        mean_squared_norm = rows.pow(2).sum(-1).mean().item()
        return cls(math.sqrt(rows.shape[1] / mean_squared_norm), rows.mean(0).float(),
                   f"the rows ({rows.shape[0]:,})")


class SparseAutoencoder(torch.nn.Module):
    """TopK or ReLU SAE in SAELens' parameter conventions, on normalized inputs (see the module docstring).

    Args:
        config: the shape and architecture.
        mean: initial ``b_dec``, in the normalized space (None: zeros).

    Returns (calling it on ``(n, d_in)``): ``(reconstruction, latents)``, ``(n, d_in)`` and ``(n, d_sae)``.

    Thread safety: a torch module: one training thread.
    """

    def __init__(self, config: SaeConfig, mean: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        directions = torch.randn(config.d_sae, config.d_in, generator=generator)
        directions /= directions.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(directions)
        self.W_enc = torch.nn.Parameter(directions.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(config.d_sae))
        b_dec = torch.zeros(config.d_in) if mean is None else mean.detach().float().clone()
        self.b_dec = torch.nn.Parameter(b_dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.config.architecture == "relu":
            return torch.relu(pre)
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(x)
        return self.decode(latents), latents

    def loss(self, x: torch.Tensor, reconstruction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Squared error summed over a row, mean over rows; plus the L1 penalty for ``relu``."""
        loss = (reconstruction - x).pow(2).sum(-1).mean()
        if self.config.architecture == "relu":
            loss = loss + self.config.l1_coefficient * latents.sum(-1).mean()  # latents >= 0: their L1 norm
        return loss

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the component of each decoder direction's gradient along that direction."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    def save(self, folder: str | os.PathLike, scaling_factor: float = 1.0,
             metadata: Mapping | None = None) -> Path:
        """Write the SAE for SAELens' ``SAE.load_from_disk(folder)``, ``scaling_factor`` folded in (it then
        takes unscaled rows). ``metadata`` goes to cfg.json's metadata (e.g. ``model_name``, ``hook_name``).
        Returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {"W_enc": self.W_enc * scaling_factor, "W_dec": self.W_dec / scaling_factor,
                   "b_enc": self.b_enc, "b_dec": self.b_dec / scaling_factor}
        save_file({name: value.detach().float().cpu().contiguous() for name, value in weights.items()},
                  folder / SAELENS_WEIGHTS)
        config = {"architecture": SAELENS_ARCHITECTURES[self.config.architecture], "d_in": self.config.d_in,
                  "d_sae": self.config.d_sae, "dtype": "float32", "device": "cpu",
                  "apply_b_dec_to_input": True,
                  "normalize_activations": "none", "reshape_activations": "none",
                  "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **(metadata or {}),
                               "norm_scaling_factor_folded": scaling_factor,
                               "training": dataclasses.asdict(self.config)}}
        if self.config.architecture == "topk":
            config |= {"k": self.config.k, "rescale_acts_by_decoder_norm": False}
        (folder / SAELENS_CONFIG).write_text(json.dumps(config, indent=2))
        return folder


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An SAE's quality on a set of rows.

    Attributes:
        rows: rows evaluated.
        fvu: fraction of variance unexplained (0 perfect, 1 no better than the rows' mean).
        l0: mean count of non-zero latents per row.
        dead_latents: latents that fired on none of the rows.

    Thread safety: immutable.
    """

    rows: int
    fvu: float
    l0: float
    dead_latents: int


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What a training loop did.

    Attributes:
        steps, rows: steps taken and rows trained on.
        seconds: wall time of the loop (reading batches included).
        tokens_per_s: rows / seconds.
        losses: every step's loss.
        l0: mean L0 of the last ``min(steps, 50)`` steps' batches.
        dead_in_training: latents no row of the last ``dead_window`` training rows fired.

    Thread safety: immutable.
    """

    steps: int
    rows: int
    seconds: float
    tokens_per_s: float
    losses: list[float]
    l0: float
    dead_in_training: int


class SaeTrainer:
    """Trains one SAE with Adam from any iterator of batches of unscaled rows.

    Args:
        sae: the SAE (its ``config`` gives the learning rate and the dead window).
        scaling_factor: what rows are multiplied by before the SAE sees them.
        device: where the SAE trains; batches are moved there.

    Thread safety: one thread.
    """

    def __init__(self, sae: SparseAutoencoder, scaling_factor: float, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.sae = sae.to(self.device)
        self.scaling_factor = scaling_factor
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=sae.config.lr)
        self.rows = 0
        # the training row count when each latent last fired (0: never), for the dead-in-training count
        self.last_fired = torch.zeros(sae.config.d_sae, dtype=torch.long, device=self.device)

    def step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One Adam step on a batch. Returns (loss, mean L0)."""
        x = batch.to(self.device, torch.float32) * self.scaling_factor
        reconstruction, latents = self.sae(x)
        loss = self.sae.loss(x, reconstruction, latents)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_gradient()
        self.optimizer.step()
        self.sae.normalize_decoder()
        self.rows += x.shape[0]
        active = latents > 0
        self.last_fired[active.any(0)] = self.rows
        return loss.item(), active.sum(-1).float().mean().item()

    def dead_in_training(self) -> int:
        window = min(self.sae.config.dead_window, self.rows)
        return int((self.last_fired <= self.rows - window).sum())

    def train(self, batches: Iterable[torch.Tensor], steps: int,
              log: Callable[[int, float, float], None] | None = None, log_every: int = 100) -> TrainingRun:
        """``steps`` steps on the first ``steps`` batches (fewer if ``batches`` ends first).

        Args:
            batches: ``(batch, d_in)`` rows as stored (unscaled), any float dtype, on any device.
            steps: steps to take.
            log: called every ``log_every`` steps and at the last with (step, the median loss and the mean L0
                of the steps since the previous call). The median, because one batch holding a "massive
                activation" row (norms 100x the median row's, at document boundaries) has a loss orders of
                magnitude above its neighbours': the trend would read as a bounce.
            log_every: steps between calls of ``log``.

        Returns: a TrainingRun.
        """
        losses, l0s, logged = [], [], 0
        started, rows = time.perf_counter(), self.rows
        for step, batch in zip(range(steps), batches):
            loss, l0 = self.step(batch)
            losses.append(loss)
            l0s.append(l0)
            if log is not None and (step % log_every == 0 or step == steps - 1):
                log(step, statistics.median(losses[logged:]), statistics.fmean(l0s[logged:]))
                logged = len(losses)
        seconds = time.perf_counter() - started
        trained = self.rows - rows
        recent = l0s[-50:]
        return TrainingRun(len(losses), trained, seconds, trained / seconds if seconds else 0.0, losses,
                           sum(recent) / max(len(recent), 1), self.dead_in_training())


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterable[torch.Tensor], scaling_factor: float) -> Evaluation:
    """FVU, L0 and dead latents over every row of ``batches`` (unscaled, as stored), in one pass: the rows'
    mean comes from float64 sums, not a second read.

    Raises:
        ConfigError: ``batches`` holds no rows.
    """
    device = sae.W_dec.device
    rows, squared_error, l0 = 0, 0.0, 0.0
    sums = torch.zeros(sae.config.d_in, dtype=torch.float64, device=device)
    squares = 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool, device=device)
    for batch in batches:
        x = batch.to(device, torch.float32) * scaling_factor
        reconstruction, latents = sae(x)
        active = latents > 0
        rows += x.shape[0]
        squared_error += (reconstruction - x).double().pow(2).sum().item()
        l0 += active.sum().item()
        sums += x.double().sum(0)
        squares += x.double().pow(2).sum().item()
        fired |= active.any(0)
    if not rows:
        raise ConfigError("no rows to evaluate on")
    variance = squares - sums.pow(2).sum().item() / rows  # summed squared deviation from the rows' mean
    return Evaluation(rows, squared_error / variance, l0 / rows, int((~fired).sum()))


def batches_of(rows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``rows`` in order, ``batch_size`` at a time (the last may be shorter): for ``evaluate``."""
    for start in range(0, rows.shape[0], batch_size):
        yield rows[start:start + batch_size]
