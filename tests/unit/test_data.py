"""Data: the embedded corpus, tokenizers, sequences, the held-out split, shards and a resumable sampler."""

import json

import numpy as np
import pytest

from train.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    DataSource,
    GlobalBatchSampler,
    HFTokenizer,
    SequenceDataset,
    build_datasets,
    main as data_main,
    micro_batches,
    rank_slice,
    stdlib_files,
)


def test_stdlib_corpus_is_real_python_source():
    files = stdlib_files()
    assert len(files) > 100
    assert any(f.name == "os.py" for f in files)
    assert files == stdlib_files()  # fixed order
    assert not any("site-packages" in f.parts for f in files)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é'\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(list(ids)) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_sequences_overlap_by_one_token_and_split_is_disjoint():
    stream = np.arange(1001, dtype=np.uint16)
    data = SequenceDataset([stream], seq_len=10)
    assert len(data) == 100
    assert list(data[1]) == list(range(10, 21))
    inputs, targets = data.batch([0, 3])
    assert inputs.shape == targets.shape == (2, 10)
    assert (targets[:, :-1] == inputs[:, 1:]).all()
    train, val = data.split(0.1)
    assert len(train) == 90 and len(val) == 10
    assert set(map(tuple, train.index)).isdisjoint(map(tuple, val.index))


def test_build_datasets_from_stdlib():
    datasets = build_datasets(DataConfig(max_bytes=200_000), seq_len=64)
    assert datasets.vocab_size == 257
    assert len(datasets.train) > 1000 and len(datasets.val) > 10


def test_sampler_resumes_exactly():
    sampler = GlobalBatchSampler(num_sequences=50, global_batch=8, seed=3)
    for _ in range(4):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(10)]  # crosses two epoch boundaries
    restored = GlobalBatchSampler(num_sequences=50, global_batch=8, seed=3)
    restored.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        assert np.array_equal(restored.next_batch(), want)


def test_sampler_covers_each_epoch_without_repeats():
    sampler = GlobalBatchSampler(num_sequences=40, global_batch=8, seed=0)
    seen = np.concatenate([sampler.next_batch() for _ in range(5)])
    assert sorted(seen) == list(range(40))
    assert not np.array_equal(sampler.next_batch(), seen[:8])  # next epoch, new order


def test_sampler_rejects_a_different_dataset():
    sampler = GlobalBatchSampler(num_sequences=50, global_batch=8, seed=3)
    other = GlobalBatchSampler(num_sequences=60, global_batch=8, seed=3)
    with pytest.raises(DataError, match="num_sequences=50 but this run has 60"):
        other.load_state_dict(sampler.state_dict())


def test_rank_slices_partition_the_global_batch():
    batch = np.arange(16)
    parts = [rank_slice(batch, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), batch)
    assert [len(m) for m in micro_batches(parts[0], 2)] == [2, 2]


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="train.global_batch=64 exceeds the 10 training sequences"):
        GlobalBatchSampler(num_sequences=10, global_batch=64, seed=0)


def test_text_source_and_missing_path(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text\n" * 200)
    datasets = build_datasets(DataConfig(source=DataSource.text, path=str(tmp_path), max_bytes=0), seq_len=16)
    assert datasets.vocab_size == 257 and len(datasets.train) > 100
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(source=DataSource.text, path=str(tmp_path / "nope")), seq_len=16)


def test_prepare_then_memmap_matches_in_memory(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text to tokenize " * 500)
    out = tmp_path / "shards"
    assert data_main(["prepare", "--input", str(tmp_path / "corpus"), "--output", str(out), "--shard-tokens", "3000"]) == 0
    assert "data=memmap" in capsys.readouterr().out
    assert len(list(out.glob("shard_*.bin"))) == 4
    mem = build_datasets(DataConfig(source=DataSource.memmap, path=str(out)), seq_len=32)
    text = build_datasets(DataConfig(source=DataSource.text, path=str(tmp_path / "corpus"), max_bytes=0), seq_len=32)
    # Sequences do not cross shard boundaries, so the memmap set has at most a few fewer sequences.
    assert 0 <= len(text.train) - len(mem.train) <= 4
    assert np.array_equal(mem.train[0], text.train[0])


def test_corrupt_shard_is_a_clear_error(tmp_path):
    out = tmp_path / "shards"
    (tmp_path / "a.txt").write_text("x" * 5000)
    data_main(["prepare", "--input", str(tmp_path / "a.txt"), "--output", str(out)])
    shard = next(out.glob("shard_*.bin"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="unreadable shards .*not 10002 bytes long"):
        build_datasets(DataConfig(source=DataSource.memmap, path=str(out)), seq_len=16)
    with pytest.raises(DataError, match="has no meta.json"):
        build_datasets(DataConfig(source=DataSource.memmap, path=str(tmp_path)), seq_len=16)


def test_hugging_face_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["the cat sat on the mat"] * 10, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    tok = HFTokenizer(str(path))
    assert tok.eos_id == tokenizer.token_to_id("</s>")
    ids = tok.encode("the cat sat")
    assert tok.decode(list(ids)) == "the cat sat"
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 100)
    datasets = build_datasets(
        DataConfig(source=DataSource.text, path=str(tmp_path / "corpus.txt"), tokenizer=str(path), max_bytes=0), seq_len=8
    )
    assert datasets.vocab_size == tokenizer.get_vocab_size() and len(datasets.train) > 10
    with pytest.raises(DataError, match="neither 'byte' nor an existing tokenizer.json"):
        HFTokenizer(str(tmp_path / "missing.json"))
