"""Train a sparse autoencoder (TopK, or ReLU + L1) on one array of a capture store and save it for SAELens.

    python examples/train_sae.py acts.zarr layer_15/residual --architecture topk --k 32 --expansion-factor 4 \
        --steps 2000 --out sae/
    python examples/train_sae.py acts.zarr layer_15/residual --architecture relu --l1-coefficient 1 --out sae/

``acts.zarr`` is the README's first capture.

Rows come from ``ActivationDataset`` with its defaults (shuffled, attention sinks left out); inputs are
scaled by the store's ``norm_scaling_factor`` and ``b_dec`` starts at its mean (manifest statistics). The SAE
(``engine.read.sae``) keeps unit-norm decoder directions and trains with Adam from a fixed seed. At the end it
is evaluated (FVU, L0, dead latents) on ``--eval-store`` (held-out rows), or else on the training store itself
(in-sample), and saved to ``--out`` in SAELens' layout: ``sae_lens.SAE.load_from_disk(out)`` loads it, and it
takes unscaled rows (the scale is folded into its weights).
"""

from __future__ import annotations

import argparse
import statistics

from engine import ActivationDataset, open_store
from engine.read.sae import (
    Evaluation,
    Normalization,
    SaeConfig,
    SaeTrainer,
    SparseAutoencoder,
    TrainingRun,
    evaluate,
)


def train(path: str, key: str, steps: int = 1000, expansion_factor: int = 4, architecture: str = "topk",
          k: int = 32, l1_coefficient: float = 1.0, lr: float = 1e-3, batch_size: int = 512, seed: int = 0,
          out: str | None = None, eval_store: str | None = None,
          log_every: int = 100) -> tuple[SparseAutoencoder, TrainingRun, Evaluation]:
    """Train, evaluate and (with ``out``) save an SAE. Returns it with its training run and evaluation."""
    store = open_store(path)
    norm = Normalization.of_store(store, key)
    data = ActivationDataset(store, key, batch_size=batch_size, seed=seed, drop_last=True)
    config = SaeConfig(data.dim, expansion_factor * data.dim, architecture, k=k,
                       l1_coefficient=l1_coefficient, lr=lr, seed=seed)
    sae = SparseAutoencoder(config, norm.mean * norm.scaling_factor)
    trainer = SaeTrainer(sae, norm.scaling_factor)

    def log(step: int, loss: float, l0: float) -> None:
        print(f"step {step:5d}  loss {loss:10.4f}  L0 {l0:7.1f}  (median loss, mean L0 since the last line)")

    run = trainer.train(data.endless_batches(), steps, log, log_every)
    held_out = ActivationDataset(eval_store or store, key, batch_size=4096, shuffle=False)
    evaluation = evaluate(sae, held_out, norm.scaling_factor)
    if out is not None:
        sae.save(out, norm.scaling_factor, {"model_name": store.manifest.model.get("name"),
                                            "hook_name": store.manifest.arrays.get(key, {}).get("tl_name"),
                                            "dataset_path": str(store.path), "array": key})
    return sae, run, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("key", help="the array, e.g. layer_15/residual")
    parser.add_argument("--architecture", choices=["topk", "relu"], default="topk")
    parser.add_argument("--expansion-factor", type=int, default=4, help="latents per input dimension")
    parser.add_argument("--k", type=int, default=32, help="latents kept per row (topk)")
    parser.add_argument("--l1-coefficient", type=float, default=1.0, help="L1 penalty weight (relu)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder to save the SAE in (SAELens' layout)")
    parser.add_argument("--eval-store", default=None, help="held-out store (default: the training store)")
    args = parser.parse_args()
    sae, run, evaluation = train(args.store, args.key, args.steps, args.expansion_factor, args.architecture,
                               args.k, args.l1_coefficient, args.lr, args.batch_size, args.seed, args.out,
                               args.eval_store)
    first, last = statistics.median(run.losses[:10]), statistics.median(run.losses[-10:])
    where = "held out" if args.eval_store else "in-sample"
    print(f"loss {first:.4f} -> {last:.4f}; {run.tokens_per_s:,.0f} tokens/s; {where} "
          f"({evaluation.rows:,} rows): FVU {evaluation.fvu:.4f}, L0 {evaluation.l0:.1f}, "
          f"dead latents {evaluation.dead_latents} of {sae.config.d_sae}")
    if args.out:
        print(f"saved to {args.out} (sae_lens.SAE.load_from_disk)")


if __name__ == "__main__":
    main()
