"""Read a data file into `(line, record)` pairs, whatever the user hands us.

Supported: JSONL (`.jsonl`, and anything not recognised below), JSON (a list of objects or
`{"data": [...]}`), CSV/TSV, Parquet, and directories saved with `datasets.save_to_disk`.

Every user mistake becomes a `DataError` naming the file and, where it applies, the line:
a missing or empty file, a binary file, text that is not UTF-8, a line that is not JSON or not
an object, and lines longer than `MAX_LINE_BYTES` (10 MB). A line that long is almost always a
file saved without newlines or a binary blob, and reading it whole would eat the memory we need
for training.

`line` is the 1-based line for JSONL, the 1-based position in the list for JSON, and the 1-based
row (header excluded) for CSV, Parquet and datasets directories.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import DataError

MAX_LINE_BYTES = 10 * 1024 * 1024
# JSON inside CSV cells: columns whose text we parse back into lists/objects.
_STRUCTURED_COLUMNS = {
    "messages",
    "conversations",
    "chosen",
    "rejected",
    "history",
    "tools",
    "input",
    "prompt",
    "completion",
    "preferred_output",
    "non_preferred_output",
    "labels",
}
_SNIFF_BYTES = 8192

OnError = Callable[[DataError], None]


@dataclass
class Records:
    """The raw records of one file, before any format detection."""

    path: str
    file_type: str  # "jsonl" | "json" | "csv" | "parquet" | "datasets"
    records: list[tuple[int, Any]] = field(default_factory=list)
    content_hash: str = ""  # sha256 of the file bytes (all files, sorted, for a directory)

    def __len__(self) -> int:
        return len(self.records)


def read_records(path: str | Path, on_error: OnError | None = None) -> Records:
    """Read `path` into records. Problems with one line go to `on_error` (and the line is skipped)
    when given, else they raise; problems with the whole file always raise `DataError`."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"File not found: {name}", code="file_not_found", param="training_file")
    if p.is_dir():
        return _read_datasets_dir(p, name)
    if p.stat().st_size == 0:
        raise DataError("The file is empty.", file=name, code="empty_file")

    suffix = "".join(p.suffixes[-1:]).lower()
    if suffix == ".parquet":
        return _read_parquet(p, name)
    head = _read_head(p)
    _check_text(head, name)
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, name, delimiter="\t" if suffix == ".tsv" else ",", on_error=on_error)
    if suffix == ".json":
        return _read_json(p, name, on_error=on_error)
    return _read_jsonl(p, name, on_error=on_error)


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of all files of a directory (relative names included)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            digest.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(functools.partial(fh.read, 1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- text checks ---------------------------------------------------------------------------------


def _read_head(p: Path) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(_SNIFF_BYTES)


def _check_text(head: bytes, name: str) -> None:
    """Refuse binary files and non-UTF-8 encodings we can name, before parsing anything."""
    for bom, encoding in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if head.startswith(bom):
            raise DataError(
                f"The file is {encoding}-encoded; training files must be UTF-8.",
                hint="Re-save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`).",
                file=name,
                code="invalid_encoding",
            )
    if head.startswith(_BINARY_MAGIC) or b"\x00" in head or _mostly_garbage(head):
        raise DataError(
            "This looks like a binary file, not text (JSONL, JSON or CSV).",
            hint="Compressed, zipped or binary files are not read; decompress or export first.",
            file=name,
            code="binary_file",
        )


_BINARY_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"PAR1", b"\x89PNG", b"%PDF", b"\xfd7zXZ", b"BZh")


def _mostly_garbage(head: bytes) -> bool:
    """Many undecodable bytes or control characters: binary, not text in a wrong encoding (a
    Latin-1 file has an accented letter here and there, and gets the encoding message instead)."""
    text = head.decode("utf-8", errors="replace")
    n = max(1, len(text))
    control = sum(1 for ch in text if ch < " " and ch not in "\t\n\r\f")
    return control > 0.1 * n or text.count("\ufffd") > 0.3 * n


def _decode(raw: bytes, name: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"Not valid UTF-8 text (byte 0x{bad} at column {exc.start + 1}).",
            hint="Training files must be UTF-8; re-save the file with UTF-8 encoding.",
            file=name,
            line=line,
            code="invalid_encoding",
        ) from None


def _too_long(name: str, line: int) -> DataError:
    return DataError(
        f"Line is longer than {MAX_LINE_BYTES // (1024 * 1024)} MB, the limit per line.",
        hint="Each example must sit on its own line; check that the file has newlines.",
        file=name,
        line=line,
        code="line_too_long",
    )


class BadJSON(ValueError):
    """Text that is not JSON we accept; `where` says where in the text, when known."""

    def __init__(self, message: str, lineno: int | None = None, colno: int | None = None):
        super().__init__(message)
        self.lineno, self.colno = lineno, colno


def _reject_constant(name: str) -> Any:
    raise BadJSON(f"{name} is not valid JSON")


def loads(text: str) -> Any:
    """`json.loads` for untrusted text. Refuses NaN/Infinity, nesting deep enough to exhaust the
    stack, and lone surrogate escapes ("\\ud800"), which parse but can be neither encoded nor
    tokenized; everything becomes a `BadJSON`, never a traceback."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadJSON(exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise BadJSON("nested too deeply") from None
    except ValueError as exc:  # our BadJSON, or e.g. an integer of more than 4300 digits
        raise BadJSON(str(exc)) from None
    if "\\ud" in text or "\\uD" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadJSON(
                "contains an unpaired surrogate escape such as \\ud800 (not valid Unicode)"
            ) from None
    return value


def _where(exc: BadJSON, with_line: bool) -> str:
    if exc.colno is None:
        return ""
    return f" (line {exc.lineno}, column {exc.colno})" if with_line else f" (column {exc.colno})"


def _report(err: DataError, on_error: OnError | None) -> None:
    if on_error is None:
        raise err
    on_error(err)


# --- formats -------------------------------------------------------------------------------------


def _read_jsonl(p: Path, name: str, on_error: OnError | None) -> Records:
    out = Records(name, "jsonl")
    digest = hashlib.sha256()
    nonblank = False
    with open(p, "rb") as fh:
        line_no = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            digest.update(raw)
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                # Stop here rather than buffer the rest: such a file is not one example per line.
                raise _too_long(name, line_no)
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as Windows editors write
            if not raw.strip():
                continue
            nonblank = True
            try:
                text = _decode(raw, name, line_no)
            except DataError as err:
                _report(err, on_error)
                continue
            try:
                value = loads(text)
            except BadJSON as exc:
                _report(
                    DataError(
                        f"Line is not valid JSON: {exc}{_where(exc, False)}.",
                        file=name,
                        line=line_no,
                        code="invalid_json",
                    ),
                    on_error,
                )
                continue
            if not isinstance(value, dict):
                _report(
                    DataError(
                        f"Each line must be a JSON object, got {_json_type(value)}.",
                        file=name,
                        line=line_no,
                        code="data_type",
                    ),
                    on_error,
                )
                continue
            out.records.append((line_no, value))
    out.content_hash = digest.hexdigest()
    if not nonblank:
        raise DataError("The file is empty (only blank lines).", file=name, code="empty_file")
    return out


def _read_json(p: Path, name: str, on_error: OnError | None) -> Records:
    raw = p.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = _decode_whole(raw.removeprefix(b"\xef\xbb\xbf"), name)
    if not text.strip():
        raise DataError("The file is empty.", file=name, code="empty_file")
    try:
        value = loads(text)
    except BadJSON as exc:
        if str(exc) == "Extra data":  # several objects one per line: it is JSONL named .json
            return _read_jsonl(p, name, on_error)
        raise DataError(
            f"Not valid JSON: {exc}{_where(exc, True)}.", file=name, line=exc.lineno, code="invalid_json"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f'A .json file must hold a list of examples or {{"data": [...]}}; got {_json_type(value)}.',
            file=name,
            code="data_type",
        )
    out = Records(name, "json", content_hash=digest)
    for i, item in enumerate(value, 1):
        if isinstance(item, dict):
            out.records.append((i, item))
        else:
            _report(
                DataError(
                    f"Each example must be a JSON object, got {_json_type(item)}.",
                    file=name,
                    line=i,
                    code="data_type",
                ),
                on_error,
            )
    return out


def _decode_whole(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"Not valid UTF-8 text (byte 0x{raw[exc.start : exc.start + 1].hex()} at column {col}).",
            hint="Training files must be UTF-8; re-save the file with UTF-8 encoding.",
            file=name,
            line=line,
            code="invalid_encoding",
        ) from None


def _read_csv(p: Path, name: str, delimiter: str, on_error: OnError | None) -> Records:
    raw = p.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = _decode_whole(raw.removeprefix(b"\xef\xbb\xbf"), name)
    if not text.strip():
        raise DataError("The file is empty.", file=name, code="empty_file")
    csv.field_size_limit(MAX_LINE_BYTES)
    out = Records(name, "csv", content_hash=digest)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    row = 0
    try:
        for row, item in enumerate(reader, 1):
            if None in item:  # more cells than header columns
                _report(
                    DataError(
                        f"Row has {len(reader.fieldnames or []) + len(item[None])} cells "
                        f"but the header has {len(reader.fieldnames or [])}.",
                        file=name,
                        line=row,
                        code="invalid_csv",
                    ),
                    on_error,
                )
                continue
            out.records.append((row, {k: _csv_cell(k, v) for k, v in item.items() if k}))
    except csv.Error as exc:
        raise DataError(f"Not valid CSV: {exc}.", file=name, line=row + 1, code="invalid_csv") from None
    if not reader.fieldnames:
        raise DataError("The CSV file has no header row.", file=name, code="invalid_csv")
    return out


def _csv_cell(column: str, value: str | None) -> Any:
    """CSV cells are strings; structured columns written as JSON are parsed back."""
    if value is None or value == "":
        return None
    stripped = value.strip()
    if column in _STRUCTURED_COLUMNS and stripped[:1] in "[{":
        try:
            return loads(stripped)
        except BadJSON:
            return value  # left as text: the format check then says what it expected
    return value


def _read_parquet(p: Path, name: str) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Not a readable Parquet file: {exc}", file=name, code="invalid_parquet") from None
    rows = table.to_pylist()
    if not rows:
        raise DataError("The Parquet file has no rows.", file=name, code="empty_file")
    return Records(name, "parquet", [(i, r) for i, r in enumerate(rows, 1)], file_hash(p))


def _read_datasets_dir(p: Path, name: str) -> Records:
    if not (
        (p / "dataset_info.json").exists()
        or (p / "dataset_dict.json").exists()
        or (p / "state.json").exists()
    ):
        raise DataError(
            "This is a directory, but not a dataset saved with `datasets.save_to_disk` "
            "(no dataset_info.json / dataset_dict.json).",
            hint="Pass a .jsonl, .json, .csv or .parquet file, or a saved datasets directory.",
            file=name,
            code="invalid_dataset_dir",
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises many types for a damaged directory
        raise DataError(
            f"Could not load the saved dataset: {exc}", file=name, code="invalid_dataset_dir"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds), None)
        if split is None:
            raise DataError("The saved DatasetDict has no splits.", file=name, code="empty_file")
        ds = ds[split]
    rows = ds.to_list()
    if not rows:
        raise DataError("The saved dataset has no rows.", file=name, code="empty_file")
    return Records(name, "datasets", [(i, r) for i, r in enumerate(rows, 1)], file_hash(p))


def _json_type(value: Any) -> str:
    return {
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
        dict: "an object",
    }.get(type(value), type(value).__name__)
