"""Shared fixtures: tiny random-weight models of every supported family (2 layers, d_model 64), and a saved
tiny llama with an offline-trained tokenizer plus a jsonl corpus for command-line runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import get_model, random_model

# Registry model per family, and the overrides that shrink it. mlp widths differ from 4*d_model on purpose,
# so a test can tell d_mlp from d_model.
TINY = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_inner=160, n_positions=128, vocab_size=256,
                          bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("pythia-1.4b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=160, vocab_size=256, max_position_embeddings=128,
                                     bos_token_id=1, eos_token_id=2)),
    "llama": ("llama-3-8b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=160, vocab_size=256,
                                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
    "gemma": ("gemma-2b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=16, intermediate_size=160, vocab_size=256, max_position_embeddings=128,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "phi": ("phi-2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                          vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
}
FAMILIES = tuple(TINY)
D_MODEL, D_MLP, N_LAYERS, VOCAB = 64, 160, 2, 256


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **config_overrides) -> torch.nn.Module:
    """A tiny random model of ``family``; ``config_overrides`` change its config further (e.g. a variant)."""
    name, overrides = TINY[family]
    return random_model(get_model(name), dtype=dtype, seed=seed, **{**overrides, **config_overrides}).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def ragged_batch(batch: int, seq: int, seed: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids + attention_mask with different lengths per row (one row fully padded when batch > 3)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    if batch > 3:
        lengths[3] = 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids[:, 0] = torch.where(mask[:, 0] == 1, 1, ids[:, 0])  # a BOS where row 0 is a real token
    return {"input_ids": ids, "attention_mask": mask}


WORDS = ("the cat sat on a mat while two dogs ran past the old barn and seven birds sang loudly "
         "in morning light over green hills").split()


def documents(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(count)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny llama with random weights and a BPE tokenizer trained here, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(documents(200), trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    model = random_model(get_model("llama-3-8b"), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, vocab_size=128,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(documents(30))))
    return path
