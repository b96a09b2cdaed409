"""The data side of pretraining: corpora -> tokenizer -> token shards -> packed batches.

    from dsv4.data import open_corpus, train_bpe, load_tokenizer, build_shards, PackedLoader, validation_batches

    corpus = open_corpus("stdlib")                       # or a file, a folder, a .jsonl file
    tok = train_bpe(corpus, 8192, save_to="run/tokenizer.json")   # or load_tokenizer("deepseek-v4")
    shards = build_shards(corpus, tok, "run/shards", seed=0)   # holds out VAL_FRACTION of the documents
    loader = PackedLoader(shards, "train", batch_size=8, seq_len=512, seed=0)
    batch = next(loader)   # batch.inputs, batch.targets, batch.input_doc_ids, batch.input_positions
    val = validation_batches(shards, batch_size=8, seq_len=512, max_batches=8)

``corpus`` reads documents, ``tokenizer`` trains or loads tokenizers, ``shards`` writes and opens token shards with
a validation split (``split_documents``: which documents), ``packing`` packs documents into rows with ``doc_ids`` and
``positions`` that keep them apart (``validation_batches``: which validation rows a run and ``dsv4 eval`` evaluate).
Each module's docstring gives its conventions.
"""

from dsv4.data.corpus import TEXT_EXTENSIONS, Corpus, Document, open_corpus, stdlib_corpus
from dsv4.data.packing import Batch, PackedLoader, validation_batches
from dsv4.data.shards import VAL_FRACTION, ShardSet, build_shards, load_shards, split_documents
from dsv4.data.tokenizer import (BOS_TOKEN, DEEPSEEK_V4, EOS_TOKEN, IGNORE_INDEX, Tokenizer, bits_per_byte,
                                 load_tokenizer, train_bpe)

__all__ = [
    "BOS_TOKEN", "DEEPSEEK_V4", "EOS_TOKEN", "IGNORE_INDEX", "TEXT_EXTENSIONS", "VAL_FRACTION",
    "Batch", "Corpus", "Document", "PackedLoader", "ShardSet", "Tokenizer",
    "bits_per_byte", "build_shards", "load_shards", "load_tokenizer", "open_corpus", "split_documents",
    "stdlib_corpus", "train_bpe", "validation_batches",
]
