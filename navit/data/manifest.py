"""``Manifest``: a CSV or JSON-lines file listing images (or clips), labels and captions."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from navit.data.folder import MediaFiles
from navit.data.stream import check_index

_INT_RE = re.compile(r"^[+-]?\d+$")


class Manifest(MediaFiles):
    """A CSV or JSON-lines file listing ``path`` and ``label`` per image.

    * ``.csv``: a header row with (at least) the columns ``path`` and ``label``.
    * ``.jsonl`` / ``.ndjson``: one object per line, ``{"path": ..., "label": ...}``; blank
      lines are skipped.

    Labels are class-name strings or integer class indices. With ``class_names`` given, strings
    must be one of them (a string of digits that is not a class name is read as an index) and
    indices must be in range. Without it: if every label is an integer, ``class_names`` is
    ``"0" .. str(max_label)``; otherwise every label is a class name and ``class_names`` is their
    sorted set (JSON integers mixed with names are an error). Relative paths are resolved against
    ``root``, by default the manifest's folder. Files are not checked at construction; loading a
    missing file raises an error naming the path and the manifest line.

    Captions (for image-text training) are optional: a ``caption`` column (CSV) or key (JSON
    lines). :attr:`has_captions` tells whether the manifest has them; :meth:`caption` returns one,
    and raises a ``ValueError`` naming the manifest (and line) if the manifest has no captions or
    that row's caption is missing, empty or not a string.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.manifest_path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(f"manifest {self.manifest_path} does not exist")
        base = root if root is not None else os.path.dirname(self.manifest_path)
        self.root = os.path.abspath(os.fspath(base))
        # Filled by the readers, one entry per row: the caption, or None where a row has none.
        self._captions: list[str | None] = []
        self.has_captions = False
        ext = os.path.splitext(self.manifest_path)[1].lower()
        if ext == ".csv":
            rows = self._read_csv()
        elif ext in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ValueError(
                f"manifest {self.manifest_path}: unknown format {ext!r} (expected .csv or .jsonl)"
            )
        if not rows:
            raise ValueError(f"manifest {self.manifest_path} lists no images")
        self._paths: list[str] = []
        self._lines: list[int] = []
        for line, p, _ in rows:
            p = os.path.expanduser(p)
            self._paths.append(p if os.path.isabs(p) else os.path.join(self.root, p))
            self._lines.append(line)
        self.class_names, self._labels = self._resolve_labels(rows, class_names)

    # Each row: (line number, path string, raw label: int or str).
    def _error(self, line: int, msg: str) -> ValueError:
        return ValueError(f"manifest {self.manifest_path}, line {line}: {msg}")

    def _read_csv(self) -> list[tuple[int, str, int | str]]:
        rows = []
        with open(self.manifest_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = None
            for record in reader:
                if header is None:
                    if not record or all(not c.strip() for c in record):
                        continue
                    header = [c.strip().lower() for c in record]
                    missing = [c for c in ("path", "label") if c not in header]
                    if missing:
                        raise self._error(
                            reader.line_num,
                            f"header {record} lacks column(s) {', '.join(missing)} "
                            "(expected a header row with columns path,label)",
                        )
                    ip, il = header.index("path"), header.index("label")
                    ic = header.index("caption") if "caption" in header else None
                    self.has_captions = ic is not None
                    continue
                if not record or all(not c.strip() for c in record):
                    continue
                if len(record) != len(header):
                    raise self._error(
                        reader.line_num, f"expected {len(header)} fields, found {len(record)}"
                    )
                p, lab = record[ip].strip(), record[il].strip()
                if not p:
                    raise self._error(reader.line_num, "empty path")
                if not lab:
                    raise self._error(reader.line_num, "empty label")
                rows.append((reader.line_num, p, lab))
                self._captions.append(record[ic].strip() or None if ic is not None else None)
        if header is None:
            raise ValueError(f"manifest {self.manifest_path} is empty (expected a header path,label)")
        return rows

    def _read_jsonl(self) -> list[tuple[int, str, int | str]]:
        rows = []
        with open(self.manifest_path, encoding="utf-8-sig") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise self._error(line_no, f"invalid JSON: {e.msg}") from e
                if not isinstance(obj, dict):
                    raise self._error(line_no, "expected a JSON object with keys path and label")
                missing = [k for k in ("path", "label") if k not in obj]
                if missing:
                    raise self._error(line_no, f"missing key(s) {', '.join(missing)}")
                p, lab = obj["path"], obj["label"]
                if not isinstance(p, str) or not p:
                    raise self._error(line_no, f"path must be a non-empty string, got {p!r}")
                if isinstance(lab, bool) or not isinstance(lab, (int, str)):
                    raise self._error(line_no, f"label must be an int or a class name, got {lab!r}")
                if isinstance(lab, str) and not lab.strip():
                    raise self._error(line_no, "empty label")
                rows.append((line_no, p, lab.strip() if isinstance(lab, str) else lab))
                cap = obj.get("caption")
                self.has_captions = self.has_captions or "caption" in obj
                self._captions.append(cap.strip() or None if isinstance(cap, str) else None)
        return rows

    def _resolve_labels(
        self, rows: list[tuple[int, str, int | str]], class_names: Sequence[str] | None
    ) -> tuple[list[str], list[int]]:
        labels: list[int] = []
        if class_names is not None:
            names = [str(c) for c in class_names]
            if not names:
                raise ValueError("class_names must not be empty")
            lookup = {n: i for i, n in enumerate(names)}
            for line, _, raw in rows:
                if isinstance(raw, str) and raw in lookup:
                    labels.append(lookup[raw])
                elif isinstance(raw, int) or _INT_RE.match(raw):
                    idx = int(raw)
                    if not 0 <= idx < len(names):
                        raise self._error(
                            line, f"label {idx} out of range for {len(names)} class_names"
                        )
                    labels.append(idx)
                else:
                    raise self._error(line, f"unknown class name {raw!r} (not in class_names)")
            return names, labels

        def is_int(raw: int | str) -> bool:
            return isinstance(raw, int) or bool(_INT_RE.match(raw))

        if all(is_int(raw) for _, _, raw in rows):
            for line, _, raw in rows:
                idx = int(raw)
                if idx < 0:
                    raise self._error(line, f"negative label {idx}")
                labels.append(idx)
            return [str(i) for i in range(max(labels) + 1)], labels
        for line, _, raw in rows:
            if isinstance(raw, int):
                raise self._error(
                    line,
                    f"integer label {raw} mixed with class-name labels; use one kind or pass class_names",
                )
        names = sorted({str(raw) for _, _, raw in rows})
        lookup = {n: i for i, n in enumerate(names)}
        return names, [lookup[str(raw)] for _, _, raw in rows]

    def __repr__(self) -> str:
        return f"Manifest({self.manifest_path!r})"

    @property
    def provides(self) -> frozenset[str]:
        return super().provides | ({"caption"} if self.has_captions else set())

    def key(self, index: int) -> str:
        return f"{super().key(index)}#{self._lines[index]}"

    def item(self, index: int) -> dict[str, Any]:
        item = super().item(index)
        if self.has_captions:
            item["caption"] = self.caption(index)
        return item

    def fields(self, index: int) -> dict[str, bytes]:
        """The file's fields (:meth:`MediaFiles.fields`) and, in a manifest with captions, ``txt``."""
        fields = super().fields(index)
        if self.has_captions:
            fields["txt"] = self.caption(index).encode("utf-8")
        return fields

    def describe(self, index: int) -> str:
        index = check_index(index, len(self), self)
        return f"{self._paths[index]} ({self.manifest_path}, line {self._lines[index]})"

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (a ``caption`` column / key); see the class docstring."""
        index = check_index(index, len(self), self)
        if not self.has_captions:
            raise ValueError(
                f"manifest {self.manifest_path} has no captions "
                "(add a 'caption' column to the CSV, or a \"caption\" key to each JSON line)"
            )
        text = self._captions[index]
        if text is None:
            raise ValueError(
                f"manifest {self.manifest_path}, line {self._lines[index]}: "
                "the caption is missing, empty or not a string"
            )
        return text


