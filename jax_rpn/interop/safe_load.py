"""Checkpoint files read without running their code.

- PyTorch files (``.pth``, zip or legacy format) go through ``torch.load(..., weights_only=True)``
  (tensors, dicts, lists, tuples, strings and numbers, and here numpy arrays and scalars);
  torch is needed only here.
- Pickles (detectron2's and Caffe2's ``.pkl``) go through :class:`SafeUnpickler`, which admits
  numpy arrays and scalars, dicts (``OrderedDict`` too), lists, tuples, strings, bytes and
  numbers, and refuses any other global, naming it, before it can be called.

:func:`read_state_dict` returns the checkpoint's arrays by name, whatever the container
(mmdet's ``{"state_dict": ...}``, detectron2's ``{"model": ...}``, Caffe2's ``{"blobs": ...}``
or a bare state dict), as float32 numpy arrays.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np

try:  # numpy >= 2 keeps the pickle helpers in numpy._core, numpy 1.x in numpy.core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core import multiarray as _multiarray

# torch.save's legacy (non-zip) format starts with this pickled number.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the config; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code (a pickled object other than plain data) when loaded."""


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode(text, "latin1")``: how protocol-2 pickles spell ``bytes``; no other
    codec is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return text.encode("latin1")


_ADMITTED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
}
PLAIN_DATA = "numpy arrays, dicts, lists, tuples, strings and numbers"
NUMERIC_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
NUMERIC_DTYPES += ("uint64", "float16", "float32", "float64")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for plain data: see :data:`_ADMITTED`; anything else raises
    :class:`UnsafeCheckpointError` naming the global, before it is called."""

    def __init__(self, file, *, source: str, admit: dict | None = None):
        super().__init__(file, encoding="latin1")  # Python 2 pickles (Caffe2's) need latin1
        self.source = source
        self.admitted = {**_ADMITTED, **(admit or {})}

    def find_class(self, module, name):
        try:
            return self.admitted[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to unpickle the global {module}.{name}: it could run "
                f"code. Only {PLAIN_DATA} are admitted in a checkpoint."
            ) from None

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(
            f"{self.source}: refused a persistent object reference ({pid!r}); this is a PyTorch "
            "file, not a plain pickle"
        )


def load_pickle(path: str, *, admit: dict | None = None):
    """The first object pickled in ``path``, through :class:`SafeUnpickler`; ``admit`` maps
    more ``(module, name)`` globals to stand-ins of the caller's (plain classes of its own)."""
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f, source=path, admit=admit).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated or not a pickle: EOFError, UnpicklingError, ...
            raise CheckpointError(
                f"{path}: not a readable pickle ({type(e).__name__}: {e}); the file may be "
                "truncated or not a checkpoint"
            ) from None


def load_torch(path: str):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with tensors as numpy."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch file; reading it needs torch: pip install 'jax_rpn[torch]'"
        ) from None
    # torch's weights-only unpickler takes tensors and plain containers; numpy arrays and
    # scalars (in mmdet's "meta", say) are plain data too, under their numpy 1 and 2 names.
    numpy_globals = [np.ndarray, np.dtype, _multiarray._reconstruct, _multiarray.scalar]
    numpy_globals += [(_multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    numpy_globals += [(_multiarray.scalar, "numpy.core.multiarray.scalar")]
    numpy_globals += [type(np.dtype(t)) for t in NUMERIC_DTYPES]
    try:
        with torch.serialization.safe_globals(numpy_globals):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "global" in line.lower()]
        raise UnsafeCheckpointError(
            f"{path}: torch.load(weights_only=True) refused it, it holds more than "
            f"{PLAIN_DATA}: {found[0] if found else str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the file may be truncated"
        ) from None

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, dict):
            return type(x)((k, to_numpy(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(to_numpy(v) for v in x)
        return x

    return to_numpy(obj)


def load_file(path: str):
    """A checkpoint file's content, read safely: PyTorch files (zip, or legacy pickles that
    start with torch's magic number) through :func:`load_torch`, other pickles through
    :func:`load_pickle`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if zipfile.is_zipfile(path):
        return load_torch(path)
    first = load_pickle(path)
    if isinstance(first, int) and first == TORCH_LEGACY_MAGIC:
        return load_torch(path)
    return first


def read_state_dict(source, *, path: str = "state dict") -> dict[str, np.ndarray]:
    """Name -> float32 numpy array from a file path or an already loaded checkpoint.

    Unwraps ``{"state_dict": ...}`` (mmdet / mmengine), ``{"model": ...}`` (detectron2, the
    torchvision references) and ``{"blobs": ...}`` (Caffe2 detection models), drops a
    ``module.`` prefix that every key has (DataParallel), and detectron2's rule for Caffe2
    files: ``*_momentum`` blobs are not weights. Entries that are not arrays (counters,
    strings) are dropped; non-numeric arrays raise :class:`CheckpointError`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        source = load_file(path)
    if not isinstance(source, dict):
        raise CheckpointError(
            f"{path}: expected a dict of arrays (a state dict), found {type(source).__name__}"
        )
    for container in ("state_dict", "model", "blobs"):
        if isinstance(source.get(container), dict):
            source = source[container]
            break
    state = {}
    for key, value in source.items():
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor given directly
            value = value.detach().cpu().float().numpy()
        if not isinstance(value, (np.ndarray, np.generic)) or str(key).endswith("_momentum"):
            continue
        value = np.asarray(value)
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise CheckpointError(
                f"{path}: {key} has dtype {value.dtype}; a weight must be a number array"
            )
        state[str(key)] = value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"{path}: holds no arrays; it is not a model checkpoint")
    return state
