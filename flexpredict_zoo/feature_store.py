"""The feature store: features of any number of images as a folder of shards, written and read without holding
them all in memory.

    DIR/index.json                    what the store holds and how it was made (see below)
    DIR/shard-00000.safetensors       rows of inputs [0, shard_size), each shard a file of `save_features`
    DIR/shard-00001.safetensors       rows of inputs [shard_size, 2 * shard_size), ...

Shard i holds the readable images among inputs [i * shard_size, (i + 1) * shard_size), in input order; its
metadata names them, lists the unreadable ones with their reasons, and carries the digest of the store's
fingerprint. A shard appears by one rename (`write_file_atomically`), so a shard file that exists is complete:
the shard files are the record of what is done, and a resumed or distributed run needs no other bookkeeping.
`index.json` is written (atomically) before the work, with the fingerprint (model, weights' sha256, options,
inputs) that decides whether a later run may continue the store, and again at the end with `complete: true`,
the names of all rows in order, the skipped images with reasons, the shape and dtype of every array.

Reading: `open_features(PATH)` opens a complete store or a single `.safetensors` feature file; the arrays are
memory-mapped (a safetensors file is a JSON header followed by the raw bytes of each tensor) and concatenated
lazily over the shards.

The writer, `flexpredict_zoo.features.extract_to_store`, runs the extraction; this module holds the layout, the
bookkeeping of a run (`begin_store`, `finish_store`) and the reader.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .atomic_write import remove_stale_temporaries, write_file_atomically
from .checkpoints import read_safetensors_header
from .locks import OutputInUseError, output_lock

__all__ = ["FeatureStore", "ShardedArray", "open_features", "begin_store", "finish_store", "StorePlan", "store_lock",
           "StoreInUseError",
           "state_dict_sha256", "fingerprint_digest", "shard_file_name", "INDEX_NAME", "SHARD_TARGET_BYTES"]

PathLike = Union[str, os.PathLike]
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
STORE_FORMAT = "flexpredict_zoo.feature_store"
STORE_FORMAT_VERSION = "1"
FILE_FORMAT = "flexpredict_zoo.features"  # the format tag of save_features' files (every shard is one)
# Default shard: a few hundred MB, so that one shard of rows in memory is cheap and a store has few files.
SHARD_TARGET_BYTES = 256 << 20
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                 "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_OPEN_ARRAYS = 64  # memory maps kept open at once (each holds a file descriptor)


def shard_file_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


# ------------------------------------------------------------------------------------------------- fingerprints

def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes, in name order): the identity of the
    weights whatever file or name they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{str(tensor.dtype)}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(fingerprint).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, Mapping):
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _short(value: Any) -> str:
    text = _canonical(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    old, new = _flatten(stored), _flatten(current)
    return [f"{key}: store {_short(old.get(key, '(absent)'))}, now {_short(new.get(key, '(absent)'))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# ----------------------------------------------------------------------------------------------- safetensors headers

def _shard_metadata(path: Path) -> Dict[str, str]:
    return dict(read_safetensors_header(path)[0].get("__metadata__") or {})


# -------------------------------------------------------------------------------------------------------- writing

class StorePlan(NamedTuple):
    """What a run has to do: the shards still missing as (shard, first input, stop input), and the index."""
    index: Dict[str, Any]
    pending: List[Tuple[int, int, int]]
    state: str  # "new", "resumed" or "complete"


class StoreInUseError(OutputInUseError):
    """Another extraction is writing to the store."""


@contextlib.contextmanager
def store_lock(out_dir: PathLike) -> Iterator[None]:
    """Hold the store's lock while one extraction (its rank 0) writes there: a second extraction into the same
    folder fails at once, naming the first, instead of mixing its shards with the first's (locks.output_lock)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir / LOCK_NAME, out_dir, "extraction", StoreInUseError):
        yield


def _store_files(out_dir: Path) -> List[Path]:
    return [p for p in out_dir.iterdir() if p.name == INDEX_NAME or (p.name.startswith("shard-")
                                                                    and p.suffix == ".safetensors")]


def begin_store(out_dir: PathLike, fingerprint: Mapping[str, Any], record: Mapping[str, Any], num_inputs: int,
                shard_size: Optional[int], default_shard_size: int, arrays: Mapping[str, Mapping[str, Any]],
                overwrite: bool = False) -> StorePlan:
    """Create the store at `out_dir`, or check that the store there was made with this `fingerprint` and find the
    shards still missing. Call it in one process only (rank 0), before any shard is written.

    `fingerprint`: what the rows depend on (model, weights, options, inputs); a store made with another one is
    never continued: ValueError naming the differences. `shard_size` None: the store's own (a resumed run), else
    `default_shard_size`. `record`: what the index records besides (versions, model file sha256, ...). `arrays`:
    {key: {"shape": per-row shape, "dtype": ...}}. `overwrite`: delete the index and shards of an existing store
    (and nothing else) and start again.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; a feature store is a folder (an output "
                                 f"path ending in .safetensors writes a single file)")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_NAME
    if overwrite:
        for path in _store_files(out_dir):
            path.unlink()
    remove_stale_temporaries(out_dir, [INDEX_NAME, "shard-*.safetensors"])  # a killed run's; we hold the lock
    index = _read_index(index_path) if index_path.is_file() else None
    if index is None:
        others = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_NAME)
        if others:
            listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(f"{out_dir} is not empty ({listed}) and holds no feature store ({INDEX_NAME}); "
                                  f"choose another output folder")
        size = shard_size or default_shard_size
        if size < 1:
            raise ValueError(f"shard size must be at least 1, got {size}")
        index = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, "complete": False,
                 "fingerprint": {**fingerprint, "shard_size": size}, **record, "num_inputs": num_inputs,
                 "shard_size": size, "num_shards": -(-num_inputs // size), "arrays": dict(arrays)}
        _write_index(index_path, index)
        return StorePlan(index, _ranges(index, range(index["num_shards"])), "new")

    wanted = {**fingerprint, "shard_size": shard_size or index.get("shard_size")}
    differences = _differences(index.get("fingerprint", {}), wanted)
    if differences:
        raise ValueError(f"{out_dir} holds features made with other settings ({'; '.join(differences)}); it is "
                         f"never mixed with new rows. Choose another output folder, or pass --overwrite "
                         f"(overwrite=True) to delete that store and start again")
    digest = fingerprint_digest(index["fingerprint"])
    done, missing = [], []
    for shard in range(index["num_shards"]):
        path = out_dir / shard_file_name(shard)
        if path.is_file():
            meta = _shard_metadata(path)
            if meta.get("store_fingerprint") != digest or int(meta.get("shard", -1)) != shard:
                raise ValueError(f"{path} does not belong to the store in {out_dir} (its fingerprint or shard "
                                 f"number differs); delete it, or pass --overwrite to start the store again")
            done.append(shard)
        else:
            missing.append(shard)
    if not missing and index.get("complete"):
        return StorePlan(index, [], "complete")
    index.update({**record, "complete": False})  # this run's record (versions, options) from now on
    _write_index(index_path, index)
    return StorePlan(index, _ranges(index, missing), "resumed" if done else "new")


def _ranges(index: Mapping[str, Any], shards: Sequence[int]) -> List[Tuple[int, int, int]]:
    size, total = index["shard_size"], index["num_inputs"]
    return [(shard, shard * size, min((shard + 1) * size, total)) for shard in shards]


def finish_store(out_dir: PathLike, index: Mapping[str, Any]) -> Dict[str, Any]:
    """After every shard is written: the final index (names of all rows in order, skipped images with reasons,
    rows per shard, `complete: true`), written atomically. Call it in one process only (rank 0)."""
    out_dir = Path(out_dir)
    names: List[str] = []
    skipped: List[Dict[str, str]] = []
    shards = []
    for shard in range(index["num_shards"]):
        path = out_dir / shard_file_name(shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the store is incomplete; run the same extraction again")
        meta = _shard_metadata(path)
        shard_names = json.loads(meta["names"])
        names.extend(shard_names)
        skipped.extend(json.loads(meta.get("skipped", "[]")))
        shards.append({"file": path.name, "rows": len(shard_names), "first_input": int(meta["first_input"]),
                       "stop_input": int(meta["stop_input"])})
    final = {**index, "complete": True, "rows": len(names), "shards": shards, "names": names, "skipped": skipped}
    _write_index(out_dir / INDEX_NAME, final)
    return final


def _write_index(path: Path, index: Mapping[str, Any]) -> None:
    text = json.dumps(index, indent=1)
    write_file_atomically(path, lambda temp: temp.write_text(text))


def _read_index(path: Path) -> Dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable feature-store index ({error}); delete the folder or choose "
                         f"another one") from None
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        raise ValueError(f"{path} is not the index of a feature store (format {STORE_FORMAT!r} expected); choose "
                         f"another output folder")
    return index


# -------------------------------------------------------------------------------------------------------- reading

class _Shard(NamedTuple):
    path: Path
    rows: int


class ShardedArray:
    """One array of a store (e.g. `pooled`, (N, D)): the memory-mapped arrays of its shards, concatenated lazily.

    `array[i]`, `array[a:b]`, `array[[i, j, ...]]` (ints, slices, int lists, numpy arrays or tensors; negative
    from the end) return torch tensors of just those rows, read from the memory maps (a copy: writing to it
    changes neither the file nor later reads). `array.shard(k)` is shard k's read-only numpy memmap;
    `np.asarray(array)` and `array[:]` read it all.
    """

    def __init__(self, store: "FeatureStore", key: str, row_shape: Tuple[int, ...], dtype: np.dtype):
        self._store, self.key, self.row_shape, self.dtype = store, key, tuple(row_shape), np.dtype(dtype)
        self._offsets = store._offsets

    @property
    def shape(self) -> Tuple[int, ...]:
        return (len(self._store), *self.row_shape)

    @property
    def num_shards(self) -> int:
        return len(self._store._shards)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ShardedArray({self.key!r}, shape={self.shape}, dtype={self.dtype}, shards={self.num_shards})"

    def shard(self, k: int) -> np.ndarray:
        return self._store._array(k, self.key)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted or not) as one numpy array, read shard by shard."""
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {self.key} with {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        if rows.size and which[0] == which[-1] and (np.diff(rows) == 1).all():
            start = int(rows[0] - self._offsets[which[0]])
            return self.shard(int(which[0]))[start:start + rows.size]
        out = np.empty((rows.size, *self.row_shape), dtype=self.dtype)
        for k in np.unique(which):
            selected = which == k
            out[selected] = self.shard(int(k))[rows[selected] - self._offsets[k]]
        return out

    def __getitem__(self, item: Any) -> torch.Tensor:
        if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.ndim == 0):
            return torch.from_numpy(np.array(self._rows(np.array([int(item)]))[0]))
        if isinstance(item, tuple):
            raise TypeError(f"{self.key}: index the rows only (array[rows]), then the returned tensor")
        if isinstance(item, slice):
            rows = np.arange(*item.indices(len(self)))
        else:
            rows = np.asarray(item.cpu().numpy() if isinstance(item, torch.Tensor) else item)
            if rows.dtype == np.bool_:
                raise TypeError("boolean masks are not supported; pass row indices (np.flatnonzero(mask))")
            rows = rows.astype(np.int64).reshape(-1)
        return torch.from_numpy(np.array(self._rows(rows)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.array(self._rows(np.arange(len(self))))
        return array.astype(dtype) if dtype is not None else array


class FeatureStore:
    """A feature store or a single feature file, opened without reading its arrays (see `open_features`).

    names: the row names in order; skipped: (name, reason) of the images without a row; len(store): rows.
    pooled, patch_tokens, labels: ShardedArray (or None when absent); intermediates / intermediate_tokens:
    {block: ShardedArray} or None; store[key] for any key of `keys` (`pooled`, `patch_tokens`, `layer_{i}`,
    `layer_{i}_tokens`, `labels`); index: the store's index (for a single file, its metadata).
    """

    def __init__(self, path: Path, index: Dict[str, Any], shards: Sequence[_Shard],
                 arrays: Mapping[str, Tuple[Tuple[int, ...], np.dtype]]):
        self.path, self.index, self._shards = path, index, list(shards)
        self._offsets = np.concatenate([[0], np.cumsum([s.rows for s in self._shards])]).astype(np.int64)
        self.names: List[str] = list(index["names"])
        self.skipped: List[Tuple[str, str]] = [(item["path"], item["reason"]) for item in index.get("skipped", [])]
        if len(self.names) != int(self._offsets[-1]):
            raise ValueError(f"{path}: {len(self.names)} names for {int(self._offsets[-1])} rows; the store is damaged")
        self._open: "OrderedDict[Tuple[int, str], np.ndarray]" = OrderedDict()
        self._headers: Dict[int, Tuple[Dict[str, Any], int]] = {}
        self.arrays = {key: ShardedArray(self, key, shape, dtype) for key, (shape, dtype) in arrays.items()}
        layers = sorted(int(k[len("layer_"):]) for k in self.arrays if k.startswith("layer_") and k[6:].isdigit())
        self.layers = layers
        self.pooled = self.arrays["pooled"]
        self.patch_tokens = self.arrays.get("patch_tokens")
        self.labels = self.arrays.get("labels")
        self.intermediates = {i: self.arrays[f"layer_{i}"] for i in layers} if layers else None
        tokens = {i: self.arrays[f"layer_{i}_tokens"] for i in layers if f"layer_{i}_tokens" in self.arrays}
        self.intermediate_tokens = tokens or None

    @property
    def keys(self) -> List[str]:
        return list(self.arrays)

    @property
    def model_name(self) -> Optional[str]:
        return self.index.get("model") or None

    @property
    def shard_paths(self) -> List[Path]:
        return [s.path for s in self._shards]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, key: str) -> ShardedArray:
        if key not in self.arrays:
            raise KeyError(f"{self.path} has no array {key!r}; it has {', '.join(self.arrays)}")
        return self.arrays[key]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={len(self)}, shards={len(self._shards)}, keys={self.keys})"

    def _array(self, shard: int, key: str) -> np.ndarray:
        cached = self._open.get((shard, key))
        if cached is not None:
            self._open.move_to_end((shard, key))
            return cached
        path = self._shards[shard].path
        if shard not in self._headers:
            header, data_start = read_safetensors_header(path)
            header.pop("__metadata__", None)  # the names: not kept twice
            self._headers[shard] = header, data_start
        header, data_start = self._headers[shard]
        if key not in header:
            raise ValueError(f"{path} has no tensor {key!r}; the store is damaged or mixed: extract it again")
        entry = header[key]
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which cannot be memory-mapped; "
                             f"load it with safetensors instead")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if begin == end:  # a shard without rows: numpy cannot map zero bytes
            array = np.empty(shape, dtype=_NUMPY_DTYPES[entry["dtype"]])
        else:
            array = np.memmap(path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r", offset=data_start + begin,
                              shape=shape)
        self._open[(shard, key)] = array
        if len(self._open) > _OPEN_ARRAYS:
            self._open.popitem(last=False)
        return array

    def iter_batches(self, batch_size: int, keys: Optional[Sequence[str]] = None, shuffle: bool = False,
                     seed: Optional[int] = None, drop_last: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches {key: tensor (B, ...)} of `keys` (default: all arrays), plus "index": the rows' positions
        (int64), read shard by shard. `shuffle`: shards in a random order, rows in a random order within each
        shard (batches cross shard boundaries), from `seed`; the same seed gives the same batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        keys = list(self.arrays) if keys is None else list(keys)
        for key in keys:
            self[key]  # an unknown key fails before the first batch
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self._shards)) if shuffle else range(len(self._shards))
        rows = np.concatenate([np.arange(self._offsets[k], self._offsets[k + 1])[
            rng.permutation(self._shards[k].rows) if shuffle else slice(None)] for k in order] or [np.zeros(0, int)])
        stop = len(rows) - (len(rows) % batch_size if drop_last else 0)
        for begin in range(0, stop, batch_size):
            batch_rows = rows[begin:begin + batch_size].astype(np.int64)
            batch = {key: self.arrays[key][batch_rows] for key in keys}
            batch["index"] = torch.from_numpy(batch_rows)
            yield batch


def _array_specs(header: Mapping[str, Any], path: Path) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    specs = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        specs[key] = (tuple(entry["shape"][1:]), np.dtype(_NUMPY_DTYPES.get(entry["dtype"], np.float32)))
    if "pooled" not in specs:
        raise ValueError(f"{path} is a safetensors file but not a feature file written by flexpredict_zoo "
                         f"(no 'pooled' tensor)")
    return specs


def open_features(path: PathLike) -> FeatureStore:
    """Open a feature store folder (written by `flexpredict-zoo extract ... --out DIR` or `extract_to_store`) or a
    single `.safetensors` feature file, without reading the arrays (see FeatureStore). An incomplete store (an
    extraction still running or stopped) is an error that says to run the extraction again."""
    path = Path(path)
    if path.is_dir():
        index_path = path / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{path} is not a feature store: {INDEX_NAME} is missing. Write one with "
                                    f"`flexpredict-zoo extract MODEL IMAGES... --out {path}`")
        index = _read_index(index_path)
        if not index.get("complete"):
            raise ValueError(f"the feature store {path} is incomplete (an extraction is running or was stopped); run "
                             f"the same extraction again to finish it")
        shards = [_Shard(path / s["file"], int(s["rows"])) for s in index["shards"]]
        arrays = {key: (tuple(spec["shape"]), np.dtype(spec["dtype"])) for key, spec in index["arrays"].items()}
        return FeatureStore(path, index, shards, arrays)
    if not path.is_file():
        raise FileNotFoundError(f"feature file or store {str(path)!r} does not exist")
    header, _ = read_safetensors_header(path)
    meta = dict(header.get("__metadata__") or {})
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a feature file written by flexpredict_zoo "
                         f"(no 'format' metadata)")
    specs = _array_specs(header, path)
    index = {**meta, "names": json.loads(meta["names"]), "skipped": json.loads(meta.get("skipped", "[]"))}
    rows = int(header["pooled"]["shape"][0])
    return FeatureStore(path, index, [_Shard(path, rows)], specs)
