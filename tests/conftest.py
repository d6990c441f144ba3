"""Shared fixtures: each supported family in turn (``family``; its tiny random-weight model is
``helpers.tiny_model``), and a saved tiny llama with an offline-trained tokenizer plus a jsonl corpus for
command-line runs. Helpers that tests import live in helpers.py, not here."""

from __future__ import annotations

import json

import pytest

from engine import get_model, random_model

from helpers import FAMILIES, documents


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


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
