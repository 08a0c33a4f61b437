"""Free Spoken Digit Dataset (FSDD): 3,000 recordings of spoken digits, 8 kHz mono 16-bit WAV.

Z. Jackson et al., Free Spoken Digit Dataset, https://github.com/Jakobovski/free-spoken-digit-dataset (v1.0.10,
Zenodo DOI 10.5281/zenodo.1342401), CC BY-SA 4.0. Files are named ``{digit}_{speaker}_{index}.wav``; 6 speakers ×
10 digits × 50 recordings.

Official split (the dataset's README): recordings with index 0–4 of every speaker and digit are the **test** set
(300 files), indices 5–49 the **train** set (2,700 files). A validation split is carved out of train, stratified by
digit, with a seed.

Layout: ``<data_dir>/fsdd/recordings/*.wav`` (``--data-dir`` / ``$DYNANEURAL_DATA``). Integrity: the md5 of the
sorted per-file md5 listing (``md5sum`` format, paths ``recordings/<name>``) must equal :data:`FSDD_TREE_MD5`, the
digest of the official v1.0.10 tree — equivalent to checking every file; where an ``MD5SUMS`` file sits in the data
folder (or in ``fsdd/``), each recording is also checked against its own entry, so a bad file is named. WAV files
are read with the standard library's ``wave`` module. ``download_fsdd`` fetches the tagged GitHub archive.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dynaneural.data.checksums import DataIntegrityError, md5_file, missing_file_error
from dynaneural.data.sources import resolve_data_dir
from dynaneural.data.splits import DatasetSplits, stratified_split

__all__ = ["FSDD_SAMPLE_RATE", "FSDD_SPEAKERS", "FSDD_TREE_MD5", "FSDDRecordings", "download_fsdd", "load_fsdd",
           "load_fsdd_recordings", "pad_waveforms", "read_wav", "verify_fsdd"]

FSDD_TREE_MD5 = "d5bddbb0b920c3be379675bfafa71524"
FSDD_SAMPLE_RATE = 8000
FSDD_NUM_FILES = 3000
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"
TEST_INDICES = range(0, 5)
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True, eq=False)
class FSDDRecordings:
    """Variable-length recordings of one split.

    Attributes:
        waveforms: float32 tensors (L_i,) in [-1, 1).
        labels: int64 (N,) spoken digit.
        speakers: speaker name of each recording.
        indices: int64 (N,) recording index (0–49).
        names: file names.
        sample_rate: 8000.
    """

    waveforms: list[torch.Tensor]
    labels: torch.Tensor
    speakers: list[str]
    indices: torch.Tensor
    names: list[str]
    sample_rate: int = FSDD_SAMPLE_RATE

    def __len__(self) -> int:
        return len(self.waveforms)

    def subset(self, idx: Sequence[int] | np.ndarray) -> FSDDRecordings:
        idx = [int(i) for i in idx]
        return FSDDRecordings(waveforms=[self.waveforms[i] for i in idx], labels=self.labels[idx],
                              speakers=[self.speakers[i] for i in idx], indices=self.indices[idx],
                              names=[self.names[i] for i in idx], sample_rate=self.sample_rate)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit PCM WAV file with the ``wave`` module: float32 samples in [-1, 1) and the sample rate.

    Raises:
        DataIntegrityError: not mono 16-bit PCM.
    """
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if channels != 1 or width != 2:
        raise DataIntegrityError(f"{path}: expected mono 16-bit PCM, got {channels} channel(s) of {8 * width} bits")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, rate


def _md5sums_entries(data_dir: Path) -> dict[str, str]:
    """Entries ``recordings/<name> -> md5`` of an ``MD5SUMS`` file in the data folder or in ``fsdd/``, if any."""
    out: dict[str, str] = {}
    for cand in (data_dir / "MD5SUMS", data_dir / "fsdd" / "MD5SUMS"):
        if cand.is_file():
            for line in cand.read_text().splitlines():
                parts = line.split(None, 1)
                if len(parts) == 2:
                    path = parts[1].strip().lstrip("*")
                    path = path[2:] if path.startswith("./") else path
                    path = path[5:] if path.startswith("fsdd/") else path
                    if path.startswith("recordings/"):
                        out[path] = parts[0].lower()
            if out:
                break
    return out


def verify_fsdd(data_dir: str | Path | None = None) -> Path:
    """Check the recordings folder (see the module docstring) and return it.

    Raises:
        FileNotFoundError: the folder or files are missing. DataIntegrityError: an md5 differs.
    """
    root = resolve_data_dir(data_dir)
    folder = root / "fsdd" / "recordings"
    if not folder.is_dir():
        raise missing_file_error([folder], name="fsdd")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".wav"))
    if len(names) != FSDD_NUM_FILES:
        raise DataIntegrityError(f"fsdd: {folder} holds {len(names)} .wav files, expected {FSDD_NUM_FILES}; download "
                                 "it again with dynaneural.data.fsdd.download_fsdd()")
    entries = _md5sums_entries(root)
    listing = []
    for n in names:
        digest = md5_file(folder / n)
        want = entries.get(f"recordings/{n}")
        if want is not None and want != digest:
            raise DataIntegrityError(f"fsdd file {folder / n} failed its md5 check: expected {want} (MD5SUMS), got "
                                     f"{digest}; download the dataset again with dynaneural.data.fsdd.download_fsdd()")
        listing.append(f"{digest}  recordings/{n}\n")
    tree = hashlib.md5("".join(listing).encode(), usedforsecurity=False).hexdigest()
    if tree != FSDD_TREE_MD5:
        raise DataIntegrityError(f"fsdd: the recordings in {folder} do not match the official v1.0.10 tree (md5 of the "
                                 f"per-file listing {tree}, expected {FSDD_TREE_MD5}); download it again with "
                                 "dynaneural.data.fsdd.download_fsdd()")
    return folder


def load_fsdd_recordings(*, data_dir: str | Path | None = None, split: Literal["train", "test", "all"] = "all",
                         verify: bool = True) -> FSDDRecordings:
    """Read the recordings of the official ``train`` (index 5–49) or ``test`` (index 0–4) split, or ``all``.

    Recordings are sorted by (digit, speaker, index), so the order is the same on every machine.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = verify_fsdd(data_dir) if verify else resolve_data_dir(data_dir) / "fsdd" / "recordings"
    if not folder.is_dir():
        raise missing_file_error([folder], name="fsdd")
    items = []
    for n in os.listdir(folder):
        m = _NAME.match(n)
        if m is None:
            continue
        digit, speaker, index = int(m.group(1)), m.group(2), int(m.group(3))
        is_test = index in TEST_INDICES
        if split == "all" or (split == "test") == is_test:
            items.append((digit, speaker, index, n))
    items.sort()
    waves, labels, speakers, indices, names = [], [], [], [], []
    for digit, speaker, index, n in items:
        samples, rate = read_wav(folder / n)
        if rate != FSDD_SAMPLE_RATE:
            raise DataIntegrityError(f"{folder / n}: sample rate {rate}, expected {FSDD_SAMPLE_RATE}")
        waves.append(torch.from_numpy(samples))
        labels.append(digit)
        speakers.append(speaker)
        indices.append(index)
        names.append(n)
    return FSDDRecordings(waveforms=waves, labels=torch.tensor(labels, dtype=torch.long), speakers=speakers,
                          indices=torch.tensor(indices, dtype=torch.long), names=names)


def pad_waveforms(waves: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """(N, length) float32: each waveform cut to ``length`` samples or zero-padded at the end (silence)."""
    out = torch.zeros(len(waves), length)
    for i, w in enumerate(waves):
        n = min(length, w.numel())
        out[i, :n] = w[:n]
    return out


def load_fsdd(*, data_dir: str | Path | None = None, seed: int = 0, val_size: int = 300,
              train_limit: int | None = None, max_seconds: float = 1.0) -> DatasetSplits:
    """FSDD as fixed-length waveforms for ``load_dataset("fsdd")``: x is float32 (N, 1, 1, L) with
    L = ``max_seconds`` × 8000 (cut or zero-padded at the end), so every split fits ``DatasetSplits``' (C, H, W).
    Compute features with ``dynaneural.temporal_wise.audio.features`` (log-mel, MFCC).

    Args:
        data_dir: data folder holding ``fsdd/recordings``.
        seed: seed of the validation split (stratified by digit, out of the official train split).
        val_size: validation recordings.
        train_limit: keep at most this many training recordings (stratified), for quick runs.
        max_seconds: waveform length kept.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    length = int(round(max_seconds * FSDD_SAMPLE_RATE))
    train = load_fsdd_recordings(data_dir=data_dir, split="train")
    test = load_fsdd_recordings(data_dir=data_dir, split="test", verify=False)  # the whole tree was just checked
    y = train.labels.numpy()
    if not isinstance(val_size, int) or not 0 <= val_size < len(y):
        raise ValueError(f"val_size must be an int in [0, {len(y)}), got {val_size!r}")
    rng = np.random.default_rng(seed)
    keep, val = stratified_split(y, n_holdout=val_size, rng=rng)
    if train_limit is not None and train_limit < len(keep):
        keep = keep[stratified_split(y[keep], n_holdout=train_limit, rng=rng)[1]]

    def wav(rec: FSDDRecordings, idx: np.ndarray | None = None) -> torch.Tensor:
        sub = rec if idx is None else rec.subset(idx)
        return pad_waveforms(sub.waveforms, length).view(len(sub), 1, 1, length)

    return DatasetSplits(name="fsdd", train_x=wav(train, keep), train_y=train.labels[keep].clone(),
                         val_x=wav(train, val), val_y=train.labels[val].clone(), test_x=wav(test),
                         test_y=test.labels.clone(), num_classes=10, input_shape=(1, 1, length), classes=DIGIT_CLASSES)


def download_fsdd(*, data_dir: str | Path | None = None, force: bool = False, url: str = FSDD_URL) -> Path:
    """Download the v1.0.10 GitHub archive, extract ``recordings/`` into ``<data_dir>/fsdd/`` and verify the tree.

    GitHub archives are not byte-stable, so the check is on the extracted files (:data:`FSDD_TREE_MD5`); on a
    mismatch nothing is left in place.
    """
    from dynaneural.data.download import fetch_url

    root = resolve_data_dir(data_dir)
    dest = root / "fsdd" / "recordings"
    if dest.is_dir() and not force:
        try:
            return verify_fsdd(root)
        except (DataIntegrityError, FileNotFoundError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fsdd-") as tmp:
        archive = Path(tmp) / "fsdd.tar.gz"
        fetch_url(url, archive)
        staging = Path(tmp) / "fsdd" / "recordings"
        staging.mkdir(parents=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-2] == "recordings" and _NAME.match(parts[-1]):
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(staging / parts[-1], "wb") as out:
                        shutil.copyfileobj(src, out)
        verify_fsdd(Path(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)
    return dest
