"""Training data: corpora, tokenizers, fixed-length sequences, a held-out split and a resumable sampler.

Sources (`data.source`):
  stdlib  the running interpreter's own standard-library `.py` files: real text on every machine, no download
  text    a text file or a folder of them (`data.path`)
  memmap  pre-tokenized shards written by `python -m train.data prepare`
Tokenizers (`data.tokenizer`): `byte` (256 byte values + end-of-document) or the path of a Hugging Face
`tokenizers` JSON file.

Sequences are cut from each document stream (or shard) at a fixed stride of seq_len tokens, with one token of
overlap so that every sequence carries its own next-token targets. The last `data.val_fraction` of them is held out.
A `GlobalBatchSampler` draws global batches from a seeded per-epoch permutation; its whole state is two integers.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from configs.errors import ConfigError


class DataError(ConfigError):
    """Unusable data: a missing path, a corrupt shard, a corpus too small. One line naming the value and the fix."""


class DataSource(str, Enum):
    stdlib = "stdlib"
    text = "text"
    memmap = "memmap"


@dataclass
class DataConfig:
    source: DataSource = DataSource.stdlib
    # File or folder for source=text; folder written by `prepare` for source=memmap.
    path: Optional[str] = None
    # "byte", the path of a Hugging Face tokenizers JSON file, or a Hugging Face model folder holding tokenizer.json.
    # Unset: the folder of checkpoint.init_from_hf when set, else "byte".
    tokenizer: Optional[str] = None
    # End-of-document token for a Hugging Face tokenizer; None picks a common one if the vocabulary has it.
    eos_token: Optional[str] = None
    # Fraction of sequences held out for evaluation (the last ones).
    val_fraction: float = 0.02
    # Cap on the text read for source=stdlib or text (bytes); 0 = no cap.
    max_bytes: int = 16 * 2**20
    # Packed documents stay apart: at each end-of-document token rotary positions restart and attention stops
    # (a token sees only its own document). Needs a tokenizer or shards that know that token.
    reset_attention_at_eod: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.max_bytes < 0:
            raise ConfigError(f"data.max_bytes={self.max_bytes} must be >= 0 (0 = no cap)")
        if self.source in (DataSource.text, DataSource.memmap) and not self.path:
            raise ConfigError(f"data.source={self.source.value} needs data.path=<file or folder>")


# ---- tokenizers ----------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: Optional[int]
    name: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus id 256 marking the end of a document."""

    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


_COMMON_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


def _folder_eos_token(folder: Path) -> Optional[str]:
    """The end-of-sequence token a model folder names in tokenizer_config.json, if any."""
    try:
        token = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError):
        return None
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file, or a model folder's tokenizer.json (no transformers dependency)."""

    def __init__(self, path: str, eos_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        if Path(path).is_dir():
            if not (Path(path) / "tokenizer.json").is_file():
                raise DataError(f"data.tokenizer={path!r} is a folder without tokenizer.json: point it at a Hugging "
                                f"Face model folder that has one, or at a tokenizer.json file")
            eos_token = eos_token or _folder_eos_token(Path(path))
            path = str(Path(path) / "tokenizer.json")
        if not Path(path).is_file():
            raise DataError(f"data.tokenizer={path!r} is neither 'byte' nor an existing tokenizer.json file")
        try:
            self._tok = _Tokenizer.from_file(path)
        except Exception as error:
            raise DataError(f"data.tokenizer={path!r} is not a Hugging Face tokenizers file ({error})") from None
        self.name = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else _COMMON_EOS
        self.eos_id = next((self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None)
        if eos_token and self.eos_id is None:
            raise DataError(f"data.eos_token={eos_token!r} is not in the vocabulary of {path}")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: Optional[str], eos_token: Optional[str] = None) -> Tokenizer:
    return ByteTokenizer() if spec in (None, "byte") else HFTokenizer(spec, eos_token)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---- corpora -------------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's own .py files, in a fixed order, without installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(path: str) -> list[Path]:
    target = Path(path)
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and not p.name.startswith("."))
        if files:
            return files
        raise DataError(f"data.path={path!r} is a folder with no files in it")
    raise DataError(f"data.path={path!r} does not exist: point it at a text file or a folder of text files")


def _binary_reason(data: bytes) -> str:
    """Why `data` is not text ("" if it is): a NUL byte in its first 8 KiB (git's and grep's test), or more than
    a third of its first 64 KiB undecodable as UTF-8."""
    if b"\0" in data[:8192]:
        return "it holds NUL bytes"
    head = data[:65536].decode("utf-8", errors="replace")
    if head and head.count("\ufffd") > len(head) / 3:
        return "most of its bytes are not UTF-8"
    return ""


def read_documents(files: Iterable[Path], max_bytes: int, check_text: bool = False) -> Iterator[str]:
    """Yield each file's text until max_bytes (0 = unlimited) have been read; undecodable bytes are replaced.
    `check_text`: a file that is not text (train/data.py `_binary_reason`) is refused rather than trained on as
    replacement characters."""
    total = 0
    for file in files:
        data = file.read_bytes()
        reason = _binary_reason(data) if check_text else ""
        if reason:
            raise DataError(f"data.path: {file} is not a text file ({reason}): remove it from the corpus, or write "
                            f"pre-tokenized shards with `python -m train.data prepare` and use data.source=memmap")
        text = data.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        yield text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream; each document is followed by the end-of-document token when the tokenizer has one."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces = []
    eos = np.asarray([tokenizer.eos_id], dtype=dtype) if tokenizer.eos_id is not None else None
    for doc in documents:
        pieces.append(tokenizer.encode(doc).astype(dtype, copy=False))
        if eos is not None:
            pieces.append(eos)
    if not pieces:
        raise DataError("the corpus is empty: no document with text was found")
    return np.concatenate(pieces)


# ---- pre-tokenized shards ------------------------------------------------------------------------------------

SHARD_FORMAT = "supertrain-tokens-v1"


def write_shards(tokens: np.ndarray, out_dir: str, tokenizer: Tokenizer, shard_tokens: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        piece = tokens[start : start + shard_tokens]
        name = f"shard_{index:05d}.bin"
        piece.tofile(out / name)
        shards.append({"file": name, "tokens": int(len(piece))})
    meta = {
        "format": SHARD_FORMAT,
        "dtype": str(tokens.dtype),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.name,
        "num_tokens": int(len(tokens)),
        "shards": shards,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def read_shards(path: str) -> tuple[list[np.ndarray], int, list[str]]:
    """Memory-map every shard listed in `path/meta.json`; returns the arrays, the vocabulary size and the shards'
    file names."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"data.path={path!r} has no meta.json: write shards with `python -m train.data prepare`")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {SHARD_FORMAT!r}")
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for shard in meta["shards"]:
            file = Path(path) / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise ValueError(f"{file.name} is missing or not {expected} bytes long")
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        return arrays, int(meta["vocab_size"]), [shard["file"] for shard in meta["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"data.path={path!r} holds unreadable shards ({error}): prepare them again") from None


# ---- sequences -----------------------------------------------------------------------------------------------


class SequenceDataset:
    """Fixed-length (seq_len + 1)-token windows over one or more token streams, at stride seq_len."""

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, index: Optional[np.ndarray] = None,
                 vocab_size: Optional[int] = None, names: Optional[Sequence[str]] = None) -> None:
        """`vocab_size`: ids a batch may hold (checked per batch: pre-tokenized shards come from outside, and an id
        beyond the embedding fails on a device as an assert, far from its cause); `names`: each stream's, for that
        line."""
        self.streams = list(streams)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.names = list(names) if names is not None else [f"stream {i}" for i in range(len(self.streams))]
        if index is None:
            rows = []
            for stream_id, stream in enumerate(self.streams):
                count = (len(stream) - 1) // seq_len
                rows.append(np.stack([np.full(count, stream_id), np.arange(count) * seq_len], axis=1))
            index = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
        self.index = index.astype(np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        stream_id, start = self.index[i]
        return self.streams[stream_id][start : start + self.seq_len + 1]

    def split(self, val_fraction: float) -> tuple["SequenceDataset", "SequenceDataset"]:
        n_val = max(1, int(round(len(self) * val_fraction)))
        if len(self) - n_val < 1:
            raise DataError(f"the corpus gives only {len(self)} sequences: use more text or a shorter train.seq_len")
        train = SequenceDataset(self.streams, self.seq_len, self.index[:-n_val], self.vocab_size, self.names)
        val = SequenceDataset(self.streams, self.seq_len, self.index[-n_val:], self.vocab_size, self.names)
        return train, val

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), seq_len) int64."""
        rows = np.stack([self[int(i)] for i in indices]).astype(np.int64)
        if self.vocab_size is not None and rows.size and rows.max() >= self.vocab_size:
            self._out_of_vocabulary(indices)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def _out_of_vocabulary(self, indices: Sequence[int]) -> None:
        """Raise the line that names the first id beyond the vocabulary among these sequences, and where it is."""
        for i in indices:
            stream_id, start = self.index[int(i)]
            bad = np.flatnonzero(self[int(i)] >= self.vocab_size)
            if bad.size:
                raise DataError(f"data.path: {self.names[stream_id]} holds token id {int(self[int(i)][bad[0]])} at "
                                f"token {int(start + bad[0])}, beyond the vocabulary of {self.vocab_size} ids its "
                                f"meta.json declares: prepare the shards again with the tokenizer they are meant for")


@dataclass
class Datasets:
    train: SequenceDataset
    val: SequenceDataset
    vocab_size: int
    description: str
    eos_id: Optional[int] = None  # the end-of-document token, where the tokenizer or the shards name one


def build_datasets(cfg: DataConfig, seq_len: int) -> Datasets:
    if cfg.source == DataSource.memmap:
        streams, vocab, names = read_shards(cfg.path)
        description = f"memmap shards at {cfg.path}"
        checked_vocab: Optional[int] = vocab
        eos_id = json.loads((Path(cfg.path) / "meta.json").read_text()).get("eos_id")  # read_shards checked it
    else:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
        files = stdlib_files() if cfg.source == DataSource.stdlib else text_files(cfg.path)
        documents = read_documents(files, cfg.max_bytes, check_text=cfg.source == DataSource.text)
        streams = [tokenize_documents(documents, tokenizer)]
        vocab = tokenizer.vocab_size
        where = "the Python standard library" if cfg.source == DataSource.stdlib else cfg.path
        description = f"{where} ({len(streams[0]):,} tokens, {tokenizer.name} tokenizer)"
        names, checked_vocab = [where], None  # our own tokenizer's ids
        eos_id = tokenizer.eos_id
    if cfg.reset_attention_at_eod and eos_id is None:
        source = f"the shards' meta.json ({cfg.path})" if cfg.source == DataSource.memmap else "the tokenizer"
        raise DataError(f"data.reset_attention_at_eod=true, but {source} names no end-of-document token: set "
                        f"data.eos_token (and prepare the shards again), or data.reset_attention_at_eod=false")
    train, val = SequenceDataset(streams, seq_len, vocab_size=checked_vocab, names=names).split(cfg.val_fraction)
    return Datasets(train, val, vocab, description, eos_id)


# ---- sampling ------------------------------------------------------------------------------------------------


class GlobalBatchSampler:
    """Global batches of sequence indices from a per-epoch seeded permutation, dropping each epoch's remainder.

    Every rank holds the same sampler and draws the same global batch; `rank_slice` picks a rank's part. The state
    (epoch, offset) is all that a resumed run needs to continue with exactly the batches it would have seen, plus the
    batches left out after a rollback (train.nonfinite=rollback), each by the (epoch, offset) it was drawn at.
    """

    def __init__(self, num_sequences: int, global_batch: int, seed: int) -> None:
        if num_sequences < global_batch:
            raise DataError(
                f"train.global_batch={global_batch} exceeds the {num_sequences} training sequences in the corpus: "
                f"lower train.global_batch or train.seq_len, or use more data"
            )
        self.num_sequences = num_sequences
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self.left_out: set[tuple[int, int]] = set()
        # (epoch, offset) of the batch drawn last
        self.last_position = (0, 0)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_sequences, generator=generator).numpy()

    def next_batch(self) -> np.ndarray:
        while True:
            if self.offset + self.global_batch > self.num_sequences:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            position = (self.epoch, self.offset)
            self.offset += self.global_batch
            if position not in self.left_out:
                self.last_position = position
                return self._order[position[1] : position[1] + self.global_batch]

    def leave_out(self, positions: Iterable[tuple[int, int]]) -> None:
        """Never draw the batches at these (epoch, offset) positions again."""
        self.left_out.update((int(e), int(o)) for e, o in positions)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "global_batch": self.global_batch,
            "left_out": sorted(self.left_out),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_sequences", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"the checkpoint's sampler has {key}={state[key]} but this run has {getattr(self, key)}: "
                    f"resume with the same data, train.seed and train.global_batch, or checkpoint.resume=none"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.left_out = set()
        self.leave_out(state.get("left_out", []))
        self._order = self._permutation(self.epoch)


def rank_slice(batch: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """This data-parallel rank's contiguous, disjoint share of a global batch."""
    share = len(batch) // dp_size
    return batch[dp_rank * share : (dp_rank + 1) * share]


def micro_batches(indices: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    return [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]


# ---- CLI: python -m train.data prepare ----------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer, args.eos_token)
    files = stdlib_files() if args.input == "stdlib" else text_files(args.input)
    tokens = tokenize_documents(read_documents(files, args.max_bytes), tokenizer)
    out = write_shards(tokens, args.output, tokenizer, args.shard_tokens)
    print(f"wrote {len(tokens):,} tokens from {len(files)} files to {out} (use data=memmap data.path={out})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text into memory-mapped shards for data=memmap")
    prep.add_argument("--input", required=True, help="a text file, a folder of text files, or 'stdlib'")
    prep.add_argument("--output", required=True, help="folder to write shard_*.bin and meta.json into")
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    prep.add_argument("--eos-token", default=None, help="end-of-document token of a Hugging Face tokenizer")
    prep.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file")
    prep.add_argument("--max-bytes", type=int, default=0, help="stop reading after this many bytes (0 = all)")
    args = parser.parse_args(argv)
    try:
        return _prepare(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
