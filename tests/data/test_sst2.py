"""SST-2 loader: tokenizer, vocabulary, padding, md5 checks and the real files."""

import shutil

import pytest
import torch

from dynaneural.data import DataIntegrityError
from dynaneural.data.sst2 import Vocabulary, encode, load_sst2, read_sst2_tsv, sentence_roots, tokenize


def test_tokenizer_lowercases_and_splits_punctuation():
    assert tokenize("It 's a Charming , often-affecting journey !") == \
        ["it", "'s", "a", "charming", ",", "often-affecting", "journey", "!"]
    assert tokenize("") == []


def test_vocabulary_min_freq_specials_and_round_trip():
    vocab = Vocabulary.build(["a b b c", "b c d"], min_freq=2)
    assert vocab.itos[:2] == ["<pad>", "<unk>"] and vocab.itos[2:] == ["b", "c"]
    assert vocab.encode("b z c") == [2, 1, 3]
    assert Vocabulary.from_json(vocab.to_json()).itos == vocab.itos
    with pytest.raises(ValueError):
        Vocabulary.build(["a"], min_freq=0)


def test_encode_pads_and_truncates():
    vocab = Vocabulary(["a", "b", "c"])
    x, n = encode(["a b", "a b c a b", ""], vocab, max_len=3)
    assert x.tolist() == [[0, 2, 3], [2, 3, 4], [0, 0, 1]] and n.tolist() == [2, 3, 1]
    x, _ = encode(["a b"], vocab, max_len=3, padding="right")
    assert x.tolist() == [[2, 3, 0]]
    with pytest.raises(ValueError):
        encode(["a"], vocab, max_len=0)


def test_sentence_roots_are_the_phrases_no_longer_phrase_contains():
    texts = ["a good movie", "good movie", "movie", "a good", "bad acting , but fun", "but fun", "fun", "a bad",
             "movie a"]
    # "movie a" is not contiguous inside "a good movie"; "a bad" is not inside any longer phrase
    assert sentence_roots(texts).tolist() == [0, 4, 7, 8]
    assert sentence_roots([]).tolist() == []


def test_real_sst2_sentence_validation(require_real):
    root = require_real("sst2/train.tsv", "sst2/dev.tsv")
    d = load_sst2(data_dir=root, val_split="sentences")
    assert d.sizes["val"] == 872 and 55_000 < d.sizes["train"] < 60_000  # each held-out sentence takes its phrases
    # as long as dev's whole sentences (random training phrases are half as long)
    assert abs(float(d.val_len.float().mean()) - float(d.test_len.float().mean())) < 2.0
    assert float(load_sst2(data_dir=root).val_len.float().mean()) < 12
    val_words = {tuple(d.vocab.decode(r[r > 0].tolist())) for r in d.val_x}
    train_words = {tuple(d.vocab.decode(r[r > 0].tolist())) for r in d.train_x}
    assert not val_words & train_words
    with pytest.raises(ValueError, match="val_split"):
        load_sst2(data_dir=root, val_split="words")


def test_real_sst2(require_real):
    root = require_real("sst2/train.tsv", "sst2/dev.tsv")
    d = load_sst2(data_dir=root, train_limit=3000, max_len=32)
    assert d.sizes == {"train": 3000, "val": 872, "test": 872}
    assert d.test_x.dtype == torch.int64 and d.test_x.shape == (872, 32)
    assert int(d.test_y.sum()) == 444  # dev: 444 positive, 428 negative
    assert 0.4 < float(d.val_y.float().mean()) < 0.65
    texts, labels = read_sst2_tsv(root / "sst2" / "dev.tsv")
    assert d.vocab.decode(d.test_x[0].tolist()) == tokenize(texts[0])[:32]


def test_corrupt_file_is_rejected(require_real, tmp_path):
    root = require_real("sst2/train.tsv", "sst2/dev.tsv")
    (tmp_path / "sst2").mkdir()
    shutil.copy(root / "sst2" / "train.tsv", tmp_path / "sst2" / "train.tsv")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nbad\t1\n")
    with pytest.raises(DataIntegrityError, match="md5"):
        load_sst2(data_dir=tmp_path)
    (tmp_path / "sst2" / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError):
        load_sst2(data_dir=tmp_path)
