"""Feed dictionary_learning's ``trainSAE`` from a capture store.

    pip install dictionary-learning      # it pins its own torch: install it where that suits you
    python examples/train_dictionary_learning.py acts.zarr layer_15/residual --steps 10000

``acts.zarr`` is the README's first capture; training runs on the GPU when there is one (``--device``).

``trainSAE(data=..., steps=...)`` iterates ``data`` for ``steps`` batches and uses each one where it is (it
does not move it to its device): ``ActivationDataset.endless_batches(device)`` yields ``(batch, d)`` tensors
already there, epoch after epoch, copied from pinned host memory on CUDA. For a crosscoder (its GitHub
version's ``CrossCoderTrainer`` reads ``(batch, n, d)``), capture one corpus from both models
(``python -m engine capture --model BASE_FOLDER --data corpus.jsonl --layers 15 --out base.zarr``, and the
same with the chat model's folder into ``chat.zarr``), then zip the stores and stack them:
``ActivationDataset({"base": "base.zarr", "chat": "chat.zarr"}, "layer_15/residual", stack=True)``.
"""

from __future__ import annotations

import argparse
from typing import Iterator

import torch

from engine import ActivationDataset, open_store


def activations(store: str, key: str, device: str, batch_size: int = 4096,
                num_workers: int = 0) -> tuple[int, Iterator[torch.Tensor]]:
    """(d, the endless stream of ``(batch_size, d)`` tensors on ``device`` that trainSAE reads)."""
    data = ActivationDataset(store, key, batch_size=batch_size, drop_last=True)  # BOS / first tokens left out
    return data.dim, data.endless_batches(device, num_workers=num_workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("key")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    from dictionary_learning.dictionary import AutoEncoder  # here: activations() needs no dictionary_learning
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.training import trainSAE

    dim, data = activations(args.store, args.key, args.device, args.batch_size, args.num_workers)
    manifest = open_store(args.store).manifest  # the trainer records the layer and model it was trained on
    trainer = dict(trainer=StandardTrainer, dict_class=AutoEncoder, activation_dim=dim, dict_size=8 * dim,
                   lr=1e-3, l1_penalty=1e-1, warmup_steps=1000, steps=args.steps, device=args.device,
                   layer=manifest.arrays[args.key].get("layer", -1), lm_name=manifest.model["name"])
    trainSAE(data=data, trainer_configs=[trainer], steps=args.steps, device=args.device,
             normalize_activations=True, save_dir="dictionary_learning_out")


if __name__ == "__main__":
    main()
