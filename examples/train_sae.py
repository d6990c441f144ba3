"""Train a minimal sparse autoencoder (ReLU encoder, linear decoder, L1 penalty) on a capture store.

    python examples/train_sae.py /tmp/gpt2_acts.zarr layer_6/residual --steps 300

Inputs are scaled with the store's norm scaling factor (manifest statistics), so the mean squared norm
of a row is its width, as SAELens does.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from engine import ActivationDataset, open_store


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.encoder = torch.nn.Linear(d_in, d_sae)
        self.decoder = torch.nn.Linear(d_sae, d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.encoder(x - self.decoder.bias))
        return self.decoder(features), features


def train(path: str, key: str, steps: int = 300, expansion: int = 4, l1: float = 1e-3, lr: float = 1e-3,
          batch_size: int = 512, seed: int = 0) -> list[float]:
    """Returns the loss of every step."""
    torch.manual_seed(seed)
    store = open_store(path)
    scale = store.manifest.statistics[key]["norm_scaling_factor"]
    data = ActivationDataset(store, key, batch_size=batch_size, exclude=("bos", "first"), seed=seed,
                             drop_last=True)
    sae = SparseAutoencoder(data.dim, expansion * data.dim)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    batches = itertools.chain.from_iterable(iter(data) for _ in itertools.count())  # epochs, reshuffled
    for step, batch in zip(range(steps), batches):
        x = batch * scale
        recon, features = sae(x)
        loss = (recon - x).pow(2).sum(-1).mean() + l1 * features.abs().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} L0 {(features > 0).float().sum(-1).mean():.1f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("key")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    losses = train(args.store, args.key, args.steps, batch_size=args.batch_size)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
