"""Train an SAE with SAELens' own SAETrainer straight from a capture store (no model, no token dataset).

    python examples/train_saelens.py acts.zarr layer_15/residual --steps 2000

``acts.zarr`` is the README's first capture; training runs on the GPU when there is one (``--device``).

SAELens' trainer takes a ``data_provider``: an iterator of ``(batch, d_in)`` tensors on its device, which
``ActivationDataset.endless_batches`` is. Its ``expected_average_only_in`` scaling factor comes from the
store's statistics when they hold ``mean_norm`` (else SAELens estimates it); ``fit()`` folds it into the SAE,
which then reads raw activations.
"""

from __future__ import annotations

import argparse

import torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import SAETrainerConfig

from engine import ActivationDataset, open_store
from engine.read.saelens import scaling_factor


def train(path: str, key: str, steps: int = 300, batch_size: int = 4096, expansion: int = 4,
          l1_coefficient: float = 1.0, lr: float = 1e-3, device: str = "cpu", seed: int = 0,
          num_workers: int = 0) -> StandardTrainingSAE:
    """Returns the trained SAE (scaling folded in: it takes raw activations)."""
    torch.manual_seed(seed)
    store = open_store(path)
    data = ActivationDataset(store, key, batch_size=batch_size, seed=seed, drop_last=True)  # no BOS / first
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=data.dim, d_sae=expansion * data.dim,
                                                        l1_coefficient=l1_coefficient,
                                                        normalize_activations="expected_average_only_in"))
    config = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                              lr=lr, lr_end=lr, device=device, n_batches_for_norm_estimate=10)
    trainer = SAETrainer(config, sae, data.endless_batches(device, num_workers=num_workers))
    trainer.activation_scaler.scaling_factor = scaling_factor(store, key)  # None: SAELens estimates it
    return trainer.fit()


@torch.no_grad()
def unexplained_variance(sae: StandardTrainingSAE, x: torch.Tensor, scale: float = 1.0) -> float:
    """||x - sae(x)||^2 / ||x - mean||^2 over a batch, the SAE reading ``x * scale``."""
    x = x * scale
    error = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1).mean()
    return (error / (x - x.mean(0)).pow(2).sum(-1).mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("key")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    sae = train(args.store, args.key, args.steps, args.batch_size, device=args.device,
                num_workers=args.num_workers)
    sample = next(iter(ActivationDataset(args.store, args.key, batch_size=8192, seed=12345)))
    error = unexplained_variance(sae, sample.to(args.device))
    print(f"unexplained variance on a batch of the store {error:.3f}")


if __name__ == "__main__":
    main()
