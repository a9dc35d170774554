"""What every dataset layout shares: the row and scan records, the file walk, the generic "not a scan" rules,
metadata tables (CSV/TSV/.xls) and the atomic manifest writer.

A layout never guesses: each file under the root ends up used (a scan, its label or mask, a metadata table),
ignored with a stated reason, or unclassified, and the unclassified ones are handed back to the user.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from brainfm.io import BrainFMInputError, atomic_path

# The project's manifest columns (brainfm.data.synthetic.MANIFEST_COLUMNS without the simulator's own
# lesion_volume_ml); dataset-specific columns follow them and are kept as metadata by the manifest reader.
BASE_COLUMNS: tuple[str, ...] = (
    "path",
    "subject",
    "dataset",
    "modality",
    "age",
    "sex",
    "site",
    "split",
    "mask",
    "label",
    "lesion_type",
)
NIFTI = r"\.nii(?:\.gz)?"
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".7z", ".rar", ".gz.enc", ".tar.gz.enc")
_DOC_SUFFIXES = (".pdf", ".md", ".html", ".htm", ".rtf", ".doc", ".docx")
_DOC_STEMS = ("readme", "license", "licence", "changes", "changelog", "citation")


@dataclass(frozen=True)
class DatasetRow:
    """One manifest row: a scan, who it belongs to, and its lesion label where the dataset ships one."""

    path: Path
    subject: str
    dataset: str
    modality: str
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    mask: Path | None = None
    label: Path | None = None
    lesion_type: str | None = None
    extra: tuple[tuple[str, str], ...] = ()


@dataclass
class DatasetScan:
    """The classification of every file under one dataset root."""

    dataset: str
    root: Path
    extra_columns: tuple[str, ...] = ()
    rows: list[DatasetRow] = field(default_factory=list)
    used: set[Path] = field(default_factory=set)  # scans, labels, masks and metadata tables that were read
    ignored: dict[Path, str] = field(default_factory=dict)  # file -> why it is deliberately not listed
    series_dirs: set[Path] = field(default_factory=set)  # DICOM series folders: their *.dcm files are used
    unclassified: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: DatasetRow) -> None:
        self.rows.append(row)
        self.use(row.path, row.mask, row.label)

    def use(self, *paths: Path | None) -> None:
        self.used.update(p for p in paths if p is not None)

    def ignore(self, paths: Iterable[Path], reason: str) -> None:
        for path in paths:
            self.ignored.setdefault(path, reason)

    @property
    def recognised(self) -> bool:
        """Whether any file matched the dataset's own naming (before the generic rules ran)."""
        return bool(self.used or self.ignored or self.series_dirs)


@dataclass(frozen=True)
class Layout:
    """A dataset as its maintainers distribute it: how to recognise it and how to read it."""

    name: str
    title: str
    expected: str  # one line: what the root should contain (used in the refusal message)
    source: str  # where the layout is documented
    scan: Callable[[Path, list[Path]], DatasetScan]  # (root, every file under it) -> classification


def list_files(root: Path) -> list[Path]:
    """Every file under ``root`` in a deterministic order (folders and names sorted)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder)
        found.extend(base / name for name in sorted(files))
    return found


def generic_reason(root: Path, path: Path) -> str | None:
    """Files that are not scans in any dataset: hidden files, archives, documentation."""
    relative = path.relative_to(root)
    if any(part.startswith(".") for part in relative.parts):
        return "hidden file"
    name = path.name.lower()
    if name.endswith(_ARCHIVE_SUFFIXES) and not re.search(NIFTI + "$", name):
        return "archive (extract it first)"
    if name.endswith(_DOC_SUFFIXES) or name.split(".")[0] in _DOC_STEMS:
        return "documentation"
    if name.endswith(".json"):
        return "JSON sidecar or description (not read)"
    return None


def finish(scan: DatasetScan, files: list[Path]) -> DatasetScan:
    """Apply the generic rules to what the layout left, and collect the rest as unclassified."""
    for path in files:
        if path in scan.used or path in scan.ignored:
            continue
        if path.parent in scan.series_dirs and path.suffix.lower() == ".dcm":
            continue
        reason = generic_reason(scan.root, path)
        if reason is not None:
            scan.ignored[path] = reason
        else:
            scan.unclassified.append(path)
    return scan


def refuse(root: Path, layout: Layout) -> BrainFMInputError:
    return BrainFMInputError(root, f"does not look like {layout.title}: expected {layout.expected}")


def nifti_stem(name: str) -> str | None:
    """The name without .nii/.nii.gz, or None for anything else."""
    match = re.match(r"^(.*)" + NIFTI + "$", name)
    return match.group(1) if match else None


def find_named(files: list[Path], *names: str) -> Path | None:
    """The one file with one of these names (case-insensitive); two different copies are an error."""
    wanted = {n.lower() for n in names}
    hits = [p for p in files if p.name.lower() in wanted]
    if len(hits) > 1:
        listed = ", ".join(str(p) for p in hits)
        raise BrainFMInputError(hits[0], f"found {len(hits)} copies of {names[0]} ({listed}); keep one")
    return hits[0] if hits else None


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV, TSV or legacy Excel (.xls, first sheet named 'Table' if there is one) as strings."""
    suffix = path.suffix.lower()
    if suffix == ".xls":
        return _read_xls(path)
    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BrainFMInputError(path, f"unreadable table ({exc})") from exc


def _read_xls(path: Path) -> list[dict[str, str]]:
    try:
        import xlrd
    except ImportError as exc:  # declared in pyproject; a bare install may still lack it
        raise BrainFMInputError(
            path,
            "reading .xls needs the xlrd package (pip install xlrd), "
            "or export the sheet to a CSV with the same name",
        ) from exc
    try:
        book = xlrd.open_workbook(str(path))
    except Exception as exc:  # xlrd raises its own XLRDError and plain struct/OSError on corrupt files
        raise BrainFMInputError(path, f"unreadable .xls ({exc})") from exc
    sheet = book.sheet_by_name("Table") if "Table" in book.sheet_names() else book.sheet_by_index(0)
    if sheet.nrows == 0:
        return []
    header = [str(v).strip() for v in sheet.row_values(0)]

    def text(value: object) -> str:
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else repr(value)
        return str(value).strip()

    return [
        dict(zip(header, (text(v) for v in sheet.row_values(i)), strict=False)) for i in range(1, sheet.nrows)
    ]


def column(rows: list[dict[str, str]], path: Path, *candidates: str, prefix: bool = False) -> str:
    """The table's column matching one of ``candidates`` (case-insensitive; ``prefix`` matches starts)."""
    names = list(rows[0]) if rows else []
    for candidate in candidates:
        for name in names:
            if name.lower() == candidate.lower() or (prefix and name.lower().startswith(candidate.lower())):
                return name
    raise BrainFMInputError(path, f"no column {candidates[0]!r} (found {names})")


def as_float(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN -> None


def sex_code(value: str, numeric: dict[int, str] | None = None) -> str | None:
    """'M'/'F' from the spellings datasets use (M/F, male/female, or a numeric code with ``numeric``)."""
    text = (value or "").strip().lower()
    if numeric is not None and as_float(text) is not None:
        return numeric.get(int(float(text)))
    if text in ("m", "male"):
        return "M"
    if text in ("f", "female"):
        return "F"
    return None


def format_number(value: float | None) -> str:
    return "" if value is None else f"{round(value, 2):g}"


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestReport:
    """What ``brainfm data manifest`` wrote and what it left out, for the console."""

    dataset: str
    manifest: Path
    sidecar: Path
    n_rows: int
    n_subjects: int
    modalities: dict[str, int]
    ignored: dict[str, int]  # reason -> number of files
    unclassified: tuple[str, ...]  # paths relative to the dataset root
    notes: tuple[str, ...]

    def summary(self, max_listed: int = 20) -> str:
        counts = ", ".join(f"{m} {n}" for m, n in self.modalities.items())
        head = f"{self.dataset}: {self.n_rows} rows from {self.n_subjects} subjects ({counts})"
        lines = [f"{head} -> {self.manifest}"]
        if self.ignored:
            total = sum(self.ignored.values())
            reasons = "; ".join(f"{reason} ({n})" for reason, n in self.ignored.items())
            lines.append(f"ignored {total} file(s): {reasons}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.unclassified:
            lines.append(
                f"{len(self.unclassified)} unclassified file(s), not listed (all in {self.sidecar}):"
            )
            lines.extend(f"  {p}" for p in self.unclassified[:max_listed])
            if len(self.unclassified) > max_listed:
                lines.append(f"  ... and {len(self.unclassified) - max_listed} more")
        else:
            lines.append("no unclassified files")
        return "\n".join(lines)


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".unclassified.txt")


def write_manifest(scan: DatasetScan, title: str, out: Path, *, overwrite: bool = False) -> ManifestReport:
    """Write the manifest and its ``.unclassified.txt`` sidecar atomically; never replace either unasked."""
    out = Path(os.path.abspath(out))
    sidecar = sidecar_path(out)
    for target in (out, sidecar):
        if target.exists() and not overwrite:
            raise BrainFMInputError(target, "already exists; pass --overwrite to replace it")
        if target.is_dir():
            raise BrainFMInputError(target, "is a folder, not a file")
    ignored = Counter(scan.ignored.values())
    if not scan.rows:
        reasons = "; ".join(f"{r} ({n})" for r, n in ignored.most_common()) or "none"
        raise BrainFMInputError(scan.root, f"found no {title} scans that can be listed (ignored: {reasons})")

    base = out.parent
    columns = BASE_COLUMNS + scan.extra_columns

    def cell(path: Path | None) -> str:
        if path is None:
            return ""
        absolute = os.path.abspath(path)
        if os.path.commonpath([absolute, base]) == str(base):
            return Path(os.path.relpath(absolute, base)).as_posix()
        return Path(absolute).as_posix()

    rows = sorted(scan.rows, key=lambda r: (r.subject, r.modality, str(r.path)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {
            "path": cell(row.path),
            "subject": row.subject,
            "dataset": row.dataset,
            "modality": row.modality,
            "age": format_number(row.age),
            "sex": row.sex or "",
            "site": row.site or "",
            "split": "",
            "mask": cell(row.mask),
            "label": cell(row.label),
            "lesion_type": row.lesion_type or "",
        }
        record.update(dict(row.extra))
        writer.writerow({c: record.get(c, "") for c in columns})
    unclassified = tuple(sorted(p.relative_to(scan.root).as_posix() for p in scan.unclassified))
    with atomic_path(out) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(sidecar) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in unclassified))
    modalities = Counter(r.modality for r in rows)
    return ManifestReport(
        dataset=scan.dataset,
        manifest=out,
        sidecar=sidecar,
        n_rows=len(rows),
        n_subjects=len({r.subject for r in rows}),
        modalities=dict(sorted(modalities.items())),
        ignored=dict(ignored.most_common()),
        unclassified=unclassified,
        notes=tuple(scan.notes),
    )
