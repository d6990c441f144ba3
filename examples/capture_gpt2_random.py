"""Capture layer 6 residual + MLP hidden of GPT-2 (random weights unless local weights are found).

    python examples/capture_gpt2_random.py --out /tmp/gpt2_acts.zarr --batches 8
"""

import argparse

import torch

from engine import CaptureConfig, CaptureEngine, load_model, open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpt2_acts.zarr")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    model = load_model("gpt2", weights="auto")  # warns loudly when it falls back to random weights
    cfg = CaptureConfig(args.out, layer_indices=[6], capture_residual=True, capture_mlp_hidden=True,
                        chunk_tokens=1024, overwrite=True, early_stop=True)
    generator = torch.Generator().manual_seed(0)
    with CaptureEngine(model, cfg) as cap, torch.no_grad():
        for _ in range(args.batches):
            ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                                generator=generator)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    print(cap.stats)
    store = open_store(args.out)
    print(store.status, store.num_tokens, "rows;", {k: store[k].shape for k in store.keys()})


if __name__ == "__main__":
    main()
