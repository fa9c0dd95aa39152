"""Read the pickled arrays of public datasets without running code from the file.

CIFAR-10's "python version" batch files and the Keras preparation of IMDB (object
arrays inside an ``.npz``) are Python pickles. ``pickle.load`` on such a file calls
whatever functions the file names, so a tampered or malicious file could run any
code. forgelab therefore never hands a file to ``pickle.load``.

Why a restricted unpickler and not a hand-written opcode parser: the standard
unpickler builds only builtin containers and atoms (dict, list, tuple, str, bytes,
int, float, bool, None) on its own. Every other object requires looking up a global
by name, and every such lookup goes through :meth:`RestrictedUnpickler.find_class`.
There we refuse all names except the handful a pickled numpy array uses, and for those
we return inert stand-ins written here (:class:`ArrayRecord`, :class:`DtypeRecord`)
instead of numpy's constructors. Nothing from numpy, and nothing the file names, is
ever called; the stand-ins only record the values the file holds, and
:func:`to_array` turns a record into an array with ``numpy.frombuffer`` after checking
dtype, shape and length.

Names accepted (anything else raises :class:`UnsafePickleError`):

- ``numpy.core.multiarray._reconstruct`` and ``numpy._core.multiarray._reconstruct``
  with ``numpy.ndarray``, and ``numpy.dtype``: how numpy pickles an array (all
  protocols for object arrays; protocols 0-4 for numeric ones);
- ``numpy.core.numeric._frombuffer`` and ``numpy._core.numeric._frombuffer``: how
  numpy pickles a numeric array at protocol 5 (with the buffer in the file);
- ``_codecs.encode``: how Python 3 writes ``bytes`` at protocol 2 (latin-1 text),
  reimplemented here for that one encoding.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np

_NUMERIC_CODES = frozenset(
    f"{kind}{size}"
    for kind in "iuf"
    for size in (1, 2, 4, 8)
    if kind != "f" or size > 2
) | {"b1"}
_OBJECT_CODES = frozenset({"O4", "O8"})


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that is not on the short list of array parts."""


class _NdarrayName:
    """Stands for ``numpy.ndarray`` inside a pickle; never instantiated."""


class DtypeRecord:
    """What a pickle says about a numpy dtype: its code, then its byte order.

    Args:
        code: Type code such as ``"u1"`` or ``"O8"``.
        align: Ignored (numpy's alignment flag).
        copy: Ignored (numpy's copy flag).
    """

    def __init__(
        self, code: object, align: object = False, copy: object = True
    ) -> None:
        if isinstance(code, bytes):
            code = code.decode("ascii", "replace")
        if not isinstance(code, str) or code not in _NUMERIC_CODES | _OBJECT_CODES:
            raise UnsafePickleError(f"unsupported array dtype {code!r}")
        self.code = code
        self.byte_order = "|"

    def __setstate__(self, state: object) -> None:
        """Record the byte order from numpy's dtype state tuple."""
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickleError("malformed dtype state")
        order = state[1]
        if isinstance(order, bytes):
            order = order.decode("ascii", "replace")
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"malformed dtype byte order {order!r}")
        self.byte_order = order

    def to_numpy(self) -> np.dtype:
        """The numpy dtype this record describes."""
        return np.dtype(self.byte_order + self.code)


class ArrayRecord:
    """What a pickle says about a numpy array: shape, dtype, order and payload."""

    def __init__(self) -> None:
        self.state: tuple | None = None

    def __setstate__(self, state: object) -> None:
        """Record numpy's state tuple ``(version, shape, dtype, fortran, data)``."""
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("malformed array state")
        self.state = state


def _reconstruct(cls: object, shape: object, typecode: object) -> ArrayRecord:
    if cls is not _NdarrayName:
        raise UnsafePickleError("_reconstruct may only build numpy.ndarray")
    return ArrayRecord()


def _frombuffer(
    buffer: object, dtype: object, shape: object, order: object
) -> ArrayRecord:
    if not isinstance(buffer, bytes | bytearray) or order not in ("C", "F"):
        raise UnsafePickleError("malformed numpy buffer pickle")
    record = ArrayRecord()
    record.state = (1, shape, dtype, order == "F", bytes(buffer))
    return record


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is accepted for latin-1 text only")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): DtypeRecord,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are the inert array stand-ins of this module.

    Python 2 strings are read as bytes, so byte payloads stay byte-exact.
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        super().__init__(stream, encoding="bytes")

    def find_class(self, module: str, name: str) -> object:
        """Return a stand-in for an allowed global; refuse every other name."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: forgelab only reads plain "
                "containers and numpy arrays from pickles"
            ) from None

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids: they would need code outside the file."""
        raise UnsafePickleError("refusing persistent ids in a pickle")


def load_restricted(payload: bytes) -> object:
    """Unpickle ``payload`` with :class:`RestrictedUnpickler`.

    Raises:
        UnsafePickleError: If the pickle names a global that is not allowed.
        pickle.UnpicklingError: If it is malformed.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(payload)).load()
    except (UnsafePickleError, pickle.UnpicklingError):
        raise
    except Exception as error:  # noqa: BLE001 - any failure means a malformed pickle
        raise pickle.UnpicklingError(f"{type(error).__name__}: {error}") from None


def to_array(record: object) -> np.ndarray | list:
    """Turn an :class:`ArrayRecord` into data, checking it on the way.

    Returns:
        A numpy array for numeric dtypes (built with ``numpy.frombuffer``), or the
        flat list of elements for object arrays (their elements are whatever plain
        values the restricted unpickler built).

    Raises:
        pickle.UnpicklingError: If the record is not a well-formed array.
    """
    if not isinstance(record, ArrayRecord) or record.state is None:
        raise pickle.UnpicklingError("expected a pickled numpy array")
    version, shape, dtype, fortran, payload = record.state
    if version != 1 or not isinstance(dtype, DtypeRecord):
        raise pickle.UnpicklingError("unsupported numpy array pickle")
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and n >= 0 for n in shape
    ):
        raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
    count = math.prod(shape)
    if dtype.code in _OBJECT_CODES:
        if not isinstance(payload, list) or len(payload) != count:
            raise pickle.UnpicklingError("object array payload does not match shape")
        return payload
    numpy_dtype = dtype.to_numpy()
    if isinstance(payload, str):
        payload = payload.encode("latin1")
    if not isinstance(payload, bytes) or len(payload) != count * numpy_dtype.itemsize:
        raise pickle.UnpicklingError(
            f"array payload does not hold {count} values of {numpy_dtype}"
        )
    array = np.frombuffer(payload, dtype=numpy_dtype)
    return array.reshape(shape, order="F" if fortran else "C")
