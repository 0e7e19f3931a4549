"""Find the external-data references of an ONNX file without the ``onnx`` package.

An ONNX tensor may keep its bytes in another file (``external_data`` entry ``location``), and
onnxruntime opens that file relative to the model. A model file crafted with a location such as
``../../etc/passwd`` would make the loader read outside the version folder, so the registry lists
every location before it hands a file to onnxruntime.

This walks the protobuf wire format along the schema paths where a TensorProto can occur
(graph initializers, sparse initializers, node attributes and their subgraphs, functions,
training info), so it needs no ``onnx`` install (``model/`` runs with only torch, numpy and
safetensors). Field numbers are those of ``onnx.proto``.
"""

from __future__ import annotations

from collections.abc import Iterator

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# (message, field number) -> child message kind, for the paths that can lead to a TensorProto.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto
_TENSOR_DATA_LOCATION = 14  # enum, EXTERNAL = 1
_MAX_DEPTH = 64  # subgraph nesting; deeper is malformed for our purposes


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf along the walked paths."""


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise OnnxFormatError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise OnnxFormatError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == _VARINT:
            v, i = _varint(buf, i)
            yield field, wt, v
        elif wt == _I64:
            i += 8
        elif wt == _I32:
            i += 4
        elif wt == _LEN:
            size, i = _varint(buf, i)
            if i + size > n:
                raise OnnxFormatError("length-delimited field runs past the end")
            yield field, wt, buf[i : i + size]
            i += size
        else:
            raise OnnxFormatError(f"unsupported wire type {wt}")
        if i > n:
            raise OnnxFormatError("field runs past the end")


def _entry(buf: memoryview) -> tuple[str, str]:
    key = value = ""
    for f, wt, v in _fields(buf):
        if wt == _LEN and isinstance(v, memoryview):
            text = bytes(v).decode("utf-8", errors="replace")
            if f == 1:
                key = text
            elif f == 2:
                value = text
    return key, value


def external_data_locations(data: bytes) -> list[str]:
    """Every external-data ``location`` referenced by tensors of the ONNX model ``data``.

    A tensor marked EXTERNAL without a location is reported as ``""``. Raises OnnxFormatError
    when the bytes are not a parseable protobuf along the walked paths.
    """
    found: list[str] = []

    def walk(buf: memoryview, kind: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise OnnxFormatError("nesting too deep")
        if kind == "tensor":
            external = False
            locations: list[str] = []
            for f, wt, v in _fields(buf):
                if f == _TENSOR_EXTERNAL_DATA and isinstance(v, memoryview):
                    key, value = _entry(v)
                    if key == "location":
                        locations.append(value)
                elif f == _TENSOR_DATA_LOCATION and wt == _VARINT and v == 1:
                    external = True
            if external and not locations:
                locations.append("")
            found.extend(locations)
            return
        children = _CHILDREN[kind]
        for f, wt, v in _fields(buf):
            if wt == _LEN and f in children and isinstance(v, memoryview):
                walk(v, children[f], depth + 1)

    walk(memoryview(data), "model", 0)
    return found
