"""The data side of pretraining: corpora -> tokenizer -> token shards -> packed batches.

    from dsv4.data import open_corpus, train_bpe, load_tokenizer, build_shards, PackedLoader

    corpus = open_corpus("stdlib")                       # or a file, a folder, a .jsonl file
    tok = train_bpe(corpus, 8192, save_to="run/tokenizer.json")   # or load_tokenizer("deepseek-v4")
    shards = build_shards(corpus, tok, "run/shards", val_fraction=0.01, seed=0)
    loader = PackedLoader(shards, "train", batch_size=8, seq_len=512, seed=0)
    batch = next(loader)   # batch.inputs, batch.targets, batch.input_doc_ids, batch.input_positions

``corpus`` reads documents, ``tokenizer`` trains or loads tokenizers, ``shards`` writes and opens token shards with
a validation split, ``packing`` packs documents into rows with ``doc_ids`` and ``positions`` that keep them apart.
Each module's docstring gives its conventions.
"""

from dsv4.data.corpus import TEXT_EXTENSIONS, Corpus, Document, open_corpus, stdlib_corpus
from dsv4.data.packing import Batch, PackedLoader
from dsv4.data.shards import ShardSet, build_shards, load_shards
from dsv4.data.tokenizer import (BOS_TOKEN, DEEPSEEK_V4, EOS_TOKEN, IGNORE_INDEX, Tokenizer, bits_per_byte,
                                 load_tokenizer, train_bpe)

__all__ = [
    "BOS_TOKEN", "DEEPSEEK_V4", "EOS_TOKEN", "IGNORE_INDEX", "TEXT_EXTENSIONS",
    "Batch", "Corpus", "Document", "PackedLoader", "ShardSet", "Tokenizer",
    "bits_per_byte", "build_shards", "load_shards", "load_tokenizer", "open_corpus", "stdlib_corpus", "train_bpe",
]
