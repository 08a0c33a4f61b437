"""SST-2 (GLUE's binary Stanford Sentiment Treebank) as token-id tensors, with a tokenizer and vocabulary built here.

Paper: R. Socher et al., "Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank", EMNLP
2013; GLUE: A. Wang et al., ICLR 2019, arXiv:1804.07461.

Layout: ``<data_dir>/sst2/{train,dev,test}.tsv`` (GLUE format: ``sentence<TAB>label`` with a header; ``test.tsv``
is unlabeled and not used). ``dev.tsv`` is the test split (GLUE's test labels are hidden) and a stratified part
of ``train.tsv`` is held out for validation. Every file is md5-checked.

``train.tsv`` holds every phrase of the treebank's parse trees (67,349, median 7 words), while dev holds whole
sentences (median 19 words). A validation split of random training *phrases* is therefore much shorter than the
test sentences: a knob calibrated on it to a read fraction does not transfer (an early-stop reader calibrated to
read 60 % of the validation tokens read 31 % of dev's). ``val_split="sentences"`` holds out whole training
sentences instead — the phrases no longer phrase contains (:func:`sentence_roots`) — and removes every phrase of
those sentences from training, so validation is as long as dev and unseen in training.

Text processing needs no download: lower-casing, a regex word tokenizer (:func:`tokenize`), a vocabulary of the
training split's words seen at least ``min_freq`` times (:class:`Vocabulary`, ``<pad>`` = 0, ``<unk>`` = 1), and
padding/truncation to ``max_len``. Padding goes on the left by default, so that a recurrent classifier reading
left to right ends on the last real word.

``DatasetSplits`` (image tensors, float32, (C, H, W)) does not fit token ids, so SST-2 has its own container
:class:`TextSplits` and loader :func:`load_sst2` (not in ``load_dataset``).
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import re
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dynaneural.data.checksums import DataIntegrityError, verify_file
from dynaneural.data.sources import resolve_data_dir
from dynaneural.data.splits import stratified_split

__all__ = ["SST2_CLASSES", "SST2_FILES", "TextSplits", "Vocabulary", "download_sst2", "encode", "load_sst2",
           "read_sst2_tsv", "sentence_roots", "tokenize"]

SST2_CLASSES = ("negative", "positive")
#: file name -> md5 (GLUE SST-2; train.tsv is the full 67,349-phrase training set).
SST2_FILES = {
    "train.tsv": "da409a0a939379ed32a470bc0f7fe99a",
    "dev.tsv": "268856b487b2a31a28c0a93daaff7288",
    "test.tsv": "3230e4efec76488b87877a56ae49675a",
}
#: the official GLUE archive (holds SST-2/{train,dev,test}.tsv)
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"

_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case and split into words, contractions (``'s``, ``n't`` stays ``n't``) and punctuation marks."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word -> id map with ``<pad>`` = 0 and ``<unk>`` = 1; ids by decreasing training frequency (ties: alphabetic).

    Args:
        words: the words after the two specials, in id order.
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = [self.PAD, self.UNK, *[w for w in words if w not in (self.PAD, self.UNK)]]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], *, min_freq: int = 1, max_size: int | None = None) -> Vocabulary:
        """Count the words of ``texts`` and keep those seen ``min_freq`` times or more (at most ``max_size``)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = collections.Counter(w for t in texts for w in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size is not None else words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 1) for w in tokenize(text)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids if int(i) != 0]

    def to_json(self) -> str:
        return json.dumps(self.itos[2:])

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls(json.loads(text))


def encode(texts: Sequence[str], vocab: Vocabulary, *, max_len: int, padding: Literal["left", "right"] = "left"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, max_len) int64 padded with 0 and truncated to the first ``max_len`` words, and lengths (N,).

    An empty text becomes one ``<unk>`` so that every sample has at least one real token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        ids = vocab.encode(t)[:max_len] or [vocab.unk_id]
        lengths[i] = len(ids)
        if padding == "left":
            out[i, max_len - len(ids):] = ids
        else:
            out[i, :len(ids)] = ids
    return torch.from_numpy(out), torch.from_numpy(lengths)


def _spans(words: Sequence[str]) -> Iterable[tuple[str, ...]]:
    n = len(words)
    return (tuple(words[i:j]) for i in range(n) for j in range(i + 1, n + 1))


def sentence_roots(texts: Sequence[str]) -> np.ndarray:
    """Indices of the phrases that are not a contiguous part of a longer phrase of ``texts``.

    On SST's phrase-level training set these are the treebank sentences (every other phrase is a subtree of one).
    Greedy from the longest phrase down: a phrase is a root unless its words occur inside an accepted root.

    Returns:
        sorted int64 indices into ``texts``.
    """
    return _roots([tuple(tokenize(t)) for t in texts])


def _roots(words: Sequence[tuple[str, ...]]) -> np.ndarray:
    seen: set[tuple[str, ...]] = set()
    roots = []
    for i in sorted(range(len(words)), key=lambda k: (-len(words[k]), k)):
        if not words[i] or words[i] in seen:
            continue
        roots.append(i)
        seen.update(_spans(words[i]))
    return np.array(sorted(roots), dtype=np.int64)


def read_sst2_tsv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Sentences and int64 labels of a labeled GLUE SST-2 file (header ``sentence<TAB>label``)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0] != ["sentence", "label"]:
        raise DataIntegrityError(f"{path}: expected the header 'sentence<TAB>label', got {rows[:1]}")
    texts, labels = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise DataIntegrityError(f"{path}:{n}: expected 'sentence<TAB>0|1', got {row!r}")
        texts.append(row[0])
        labels.append(int(row[1]))
    return texts, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class TextSplits:
    """Train / validation / test token ids of a text classification set (the text analogue of DatasetSplits).

    Attributes:
        name: ``sst2``.
        train_x, val_x, test_x: int64 (N, max_len) token ids, padded with 0 (``padding`` side).
        train_y, val_y, test_y: int64 (N,) labels.
        train_len, val_len, test_len: int64 (N,) number of real tokens of each sample.
        test_text: the raw test sentences (for pictures and error analysis).
        vocab: the vocabulary (built on the training split only).
        num_classes: 2. classes: class names. input_shape: ``(max_len,)``. padding: ``left`` or ``right``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_len: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_len: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_len: torch.Tensor
    test_text: tuple[str, ...]
    vocab: Vocabulary
    num_classes: int
    classes: tuple[str, ...]
    input_shape: tuple[int]
    padding: str = "left"

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y, n = (getattr(self, f"{split}_{k}") for k in ("x", "y", "len"))
            if x.dtype != torch.int64 or x.dim() != 2 or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"{split}_x must be int64 (N, {self.input_shape[0]}), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],) or n.shape != (x.shape[0],):
                raise ValueError(f"{split}_y and {split}_len must have shape ({x.shape[0]},)")
            if x.numel() and int(x.max()) >= len(self.vocab):
                raise ValueError(f"{split}_x holds ids outside the vocabulary of {len(self.vocab)}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def load_sst2(*, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 872,
              train_limit: int | None = None, max_len: int = 48, min_freq: int = 2, max_vocab: int | None = None,
              padding: Literal["left", "right"] = "left",
              val_split: Literal["phrases", "sentences"] = "phrases") -> TextSplits:
    """Load SST-2 from ``<data_dir>/sst2/`` (md5-checked) as token-id tensors.

    Args:
        data_dir: Data folder (argument, else ``$DYNANEURAL_DATA``, else ``~/.cache/dynaneural/data``).
        seed: Seed of the stratified validation split and of the ``train_limit`` subsample.
        val_size: Training phrases held out for validation (the default matches dev's 872).
        train_limit: Keep at most this many training phrases (stratified), for quick runs.
        max_len: Pad/truncate every sample to this many tokens (dev sentences have at most 56 words, 99.5 % fit 48).
        min_freq: Keep training words seen at least this often; others become ``<unk>``.
        max_vocab: Cap on the vocabulary size (most frequent first).
        padding: ``left`` (default; a left-to-right RNN ends on the last word) or ``right``.
        val_split: ``phrases`` (a stratified sample of training phrases) or ``sentences`` (whole training sentences,
            with all their phrases removed from training; as long as dev's sentences, see the module docstring).

    Returns:
        The splits; test is GLUE's dev set (872 sentences).

    Raises:
        FileNotFoundError: A file is missing. DataIntegrityError: a file fails its md5 or is malformed.
    """
    folder = resolve_data_dir(data_dir) / "sst2"
    for name in ("train.tsv", "dev.tsv"):
        verify_file(folder / name, expected=SST2_FILES[name], name="sst2")
    train_text, train_y = read_sst2_tsv(folder / "train.tsv")
    test_text, test_y = read_sst2_tsv(folder / "dev.tsv")
    if not isinstance(val_size, int) or not 0 <= val_size < len(train_y):
        raise ValueError(f"val_size must be an int in [0, {len(train_y)}), got {val_size!r}")
    rng = np.random.default_rng(seed)
    if val_split == "phrases":
        train_idx, val_idx = stratified_split(train_y, n_holdout=val_size, rng=rng)
    elif val_split == "sentences":
        words = [tuple(tokenize(t)) for t in train_text]
        roots = _roots(words)
        if val_size > len(roots):
            raise ValueError(f"val_size {val_size} exceeds the {len(roots)} training sentences")
        val_idx = roots[stratified_split(train_y[roots], n_holdout=val_size, rng=rng)[1]]
        held: set[tuple[str, ...]] = set()
        for i in val_idx:
            held.update(_spans(words[i]))
        train_idx = np.array([i for i, w in enumerate(words) if w not in held], dtype=np.int64)
    else:
        raise ValueError(f"val_split must be 'phrases' or 'sentences', got {val_split!r}")
    if train_limit is not None:
        if not isinstance(train_limit, int) or train_limit < 1:
            raise ValueError(f"train_limit must be a positive int or None, got {train_limit!r}")
        if train_limit < len(train_idx):
            train_idx = train_idx[stratified_split(train_y[train_idx], n_holdout=train_limit, rng=rng)[1]]
    vocab = Vocabulary.build((train_text[i] for i in train_idx), min_freq=min_freq, max_size=max_vocab)

    def enc(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode(texts, vocab, max_len=max_len, padding=padding)

    tr_x, tr_n = enc([train_text[i] for i in train_idx])
    va_x, va_n = enc([train_text[i] for i in val_idx])
    te_x, te_n = enc(test_text)
    return TextSplits(name="sst2", train_x=tr_x, train_y=torch.from_numpy(train_y[train_idx]), train_len=tr_n,
                      val_x=va_x, val_y=torch.from_numpy(train_y[val_idx]), val_len=va_n, test_x=te_x,
                      test_y=torch.from_numpy(test_y), test_len=te_n, test_text=tuple(test_text), vocab=vocab,
                      num_classes=2, classes=SST2_CLASSES, input_shape=(max_len,), padding=padding)


def download_sst2(*, data_dir: str | Path | None = None, url: str = SST2_URL, force: bool = False) -> list[Path]:
    """Fetch GLUE's SST-2 archive and place ``{train,dev,test}.tsv`` in ``<data_dir>/sst2/``, md5-checked.

    Files already present and valid are kept (unless ``force``). The archive itself has no published md5, so the
    extracted files are checked; a mismatch raises and leaves the folder untouched.
    """
    from dynaneural.data.checksums import md5_file
    from dynaneural.data.download import fetch_url

    folder = resolve_data_dir(data_dir) / "sst2"
    paths = [folder / n for n in SST2_FILES]
    if not force and all(p.is_file() and md5_file(p) == SST2_FILES[p.name] for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = Path(tmp) / "SST-2.zip"
        fetch_url(url, archive)
        with zipfile.ZipFile(archive) as z:
            payload = {n: z.read(f"SST-2/{n}") for n in SST2_FILES}
        for n, data in payload.items():
            got = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if got != SST2_FILES[n]:
                raise DataIntegrityError(f"SST-2 archive from {url}: {n} has md5 {got}, expected {SST2_FILES[n]}")
        for n, data in payload.items():
            part = Path(tmp) / n
            part.write_bytes(data)
            part.chmod(0o644)
            part.replace(folder / n)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dynaneural.data.sst2 [--data-dir DIR] [--force]``: download SST-2."""
    p = argparse.ArgumentParser(prog="python -m dynaneural.data.sst2", description="download GLUE SST-2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    for path in download_sst2(data_dir=args.data_dir, force=args.force):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
