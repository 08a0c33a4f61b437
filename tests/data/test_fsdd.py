"""FSDD loader: md5-verified tree, official split by recording index, WAV parsing with the wave module."""

import shutil
import wave

import numpy as np
import pytest
import torch

from dynaneural.data import DataIntegrityError
from dynaneural.data.fsdd import load_fsdd, load_fsdd_recordings, pad_waveforms, read_wav, verify_fsdd


def _write_wav(path, samples, rate=8000, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def test_read_wav_scales_int16(tmp_path):
    _write_wav(tmp_path / "a.wav", [0, 16384, -32768, 32767])
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and x.dtype == np.float32
    np.testing.assert_allclose(x, [0.0, 0.5, -1.0, 32767 / 32768])
    _write_wav(tmp_path / "s.wav", [0, 1, 2, 3], channels=2)
    with pytest.raises(DataIntegrityError, match="mono"):
        read_wav(tmp_path / "s.wav")


def test_pad_waveforms():
    out = pad_waveforms([torch.ones(3), torch.ones(7)], 5)
    assert out.tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="DYNANEURAL_DATA"):
        verify_fsdd(tmp_path)


def test_real_fsdd_official_split(require_real):
    root = require_real("fsdd/recordings/0_george_0.wav", "fsdd/recordings/9_yweweler_49.wav")
    test = load_fsdd_recordings(data_dir=root, split="test")
    train = load_fsdd_recordings(data_dir=root, split="train", verify=False)
    assert len(test) == 300 and len(train) == 2700
    assert test.indices.max() == 4 and train.indices.min() == 5
    assert test.labels.bincount().tolist() == [30] * 10
    assert sorted(set(test.speakers)) == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    lengths = [w.numel() for w in test.waveforms]
    assert min(lengths) > 1000 and max(lengths) < 8000 * 2.3
    splits = load_fsdd(data_dir=root, seed=0, val_size=300)
    assert splits.sizes == {"train": 2400, "val": 300, "test": 300}
    assert splits.train_x.shape[1:] == (1, 1, 8000)
    assert splits.val_y.bincount().tolist() == [30] * 10


def test_corrupted_file_is_named(require_real, tmp_path):
    root = require_real("fsdd/recordings/0_george_0.wav")
    dest = tmp_path / "fsdd" / "recordings"
    shutil.copytree(root / "fsdd" / "recordings", dest)
    (tmp_path / "MD5SUMS").write_text((root / "MD5SUMS").read_text() if (root / "MD5SUMS").is_file() else "")
    bad = dest / "3_theo_7.wav"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match="3_theo_7.wav" if (root / "MD5SUMS").is_file() else "tree"):
        verify_fsdd(tmp_path)
