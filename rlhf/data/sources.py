"""Where records come from: local files, directories of split files, hub datasets, shipped tasks.

Everything is read with `datasets`; what this module adds is resolution of `task:` paths and
errors that name the file and line (or the dataset and split) instead of an Arrow stack trace.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np

from rlhf.config import SourceConfig
from rlhf.data.formats import prompt_keys
from rlhf.errors import DataError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TASK_SCHEME = "task:"
# Added when a split is carved out of another: the record's 1-based row in the source.
ROW_COLUMN = "__row__"


@dataclass(frozen=True)
class Split:
    """One split's records and a human-readable name of where they came from (for errors)."""

    records: datasets.Dataset
    origin: str


def _task(path: str) -> tuple[ModuleType, str, str]:
    """task:<name>/<kind> -> (the task's module, name, kind)."""
    name, _, kind = path[len(TASK_SCHEME) :].partition("/")
    try:
        return importlib.import_module(f"rlhf.tasks.{name}"), name, kind
    except ModuleNotFoundError:
        raise DataError(f"{path}: no shipped task named {name!r} (see rlhf/tasks)") from None


def resolve_task_path(path: str, task_seed: int, task_noise: float) -> str:
    """task:<name>/<kind> -> the directory of that kind's split files, generated on first use."""
    from rlhf.models import cache_root

    task, name, kind = _task(path)
    if kind not in task.KINDS:
        raise DataError(f"{path}: task {name!r} has no data kind {kind!r}; it has {', '.join(task.KINDS)}")
    root = task.materialize(cache_root() / "tasks", seed=task_seed, noise=task_noise)
    return str(Path(root) / kind)


def task_slice_column(path: str | None) -> str | None:
    """The column a shipped task's records are sliced by in evaluation (its SLICE_COLUMN), for a
    task:<name>/<kind> path; None for any other path."""
    if not path or not path.startswith(TASK_SCHEME):
        return None
    return getattr(_task(path)[0], "SLICE_COLUMN", None)


def gold_annotator(setting: str | None, path: str | None) -> str | None:
    """The gold annotator (module.function) for data read from `path`, or None.

    `setting` is data.gold_reward: auto gives a shipped task's own annotator only when the data comes
    from that task (task:<name>/...), since it knows nothing of other prompts; any other value is
    the user's explicit choice, kept whatever the data; null: none.
    """
    if setting != "auto":
        return setting or None
    if not path or not path.startswith(TASK_SCHEME):
        return None
    module, name, _ = _task(path)
    return f"rlhf.tasks.{name}.gold_reward" if callable(getattr(module, "gold_reward", None)) else None


def _split_files(directory: Path) -> dict[str, str]:
    files = {}
    for file in sorted(directory.iterdir()):
        if file.suffix in FILE_BUILDERS and not file.name.startswith("."):
            files.setdefault(file.stem, str(file))
    return files


def _text_problem(file: str) -> str | None:
    """Why a text file cannot be read as UTF-8, naming the line and byte; None if it can.

    Arrow's JSON reader does not validate UTF-8, so a Latin-1 file would load and fail later, row by
    row: every text file is checked up front, in large line-aligned chunks (about a second a GB).
    """
    with open(file, "rb") as handle:
        if handle.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return f"{file}: byte 0: UTF-16 text (byte-order mark); save the file as UTF-8"
        handle.seek(0)
        offset, lines = 0, 0
        while chunk := handle.read(1 << 24) + handle.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                line = lines + chunk.count(b"\n", 0, err.start) + 1
                return (
                    f"{file}:{line}: byte {offset + err.start}: not UTF-8 text (0x{chunk[err.start]:02x}); "
                    "save the file as UTF-8"
                )
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    return None


def _locate_problem(file: str, builder: str) -> str | None:
    """Where a UTF-8 file that `datasets` could not read goes wrong, as `<file>:<line>: ...`, if we
    can tell: empty, or (JSON) the first line that is not a JSON object."""
    path = Path(file)
    with open(path, encoding="utf-8-sig") as handle:
        blank = all(not line.strip() for line in handle)
    if blank:
        expected = (
            "one JSON object per line" if builder == "json" else "a header row, then one record per row"
        )
        return f"{file}: the file is empty ({path.stat().st_size} bytes); expected {expected}"
    if builder != "json":
        return None
    with open(path, encoding="utf-8-sig") as handle:
        if file.endswith(".json"):
            try:
                json.load(handle)
            except json.JSONDecodeError as err:
                return f"{file}:{err.lineno}: malformed JSON ({err.msg})"
            return None
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{file}:{number}: malformed JSON line ({err.msg})"
            if not isinstance(value, dict):
                return f"{file}:{number}: expected a JSON object per line, got {type(value).__name__}"
    return None


def _wrapped_records(records: datasets.Dataset, file: str) -> str | None:
    """A JSON document holding the records in one field ({"data": [...]}) reads as one record."""
    if len(records) != 1 or len(records.column_names) != 1:
        return None
    column = records.column_names[0]
    value = records[0][column]
    # A message list is a record's field, not a list of records.
    if isinstance(value, list) and value and all(isinstance(v, dict) and "role" not in v for v in value):
        return (
            f"{file}: one JSON object holding {len(value)} records under {column!r}; write the records "
            "themselves, one JSON object per line (JSON lines) or as a JSON array"
        )
    return None


def _read_file(file: str, key: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(Path(file).suffix)
    if builder is None:
        raise DataError(f"{key}: {file}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
    if builder in ("json", "csv"):
        problem = _text_problem(file)
        if problem:
            raise DataError(problem)
    # datasets logs its parse failures as errors of its own; the one line below says where instead.
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        records = datasets.load_dataset(builder, data_files=file, split="train")
    except Exception as err:
        located = _locate_problem(file, builder) if builder in ("json", "csv") else None
        if located:
            raise DataError(located) from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        cause = err.__cause__ or err.__context__
        if cause is not None and str(cause).strip():
            first += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
        raise DataError(f"{file}: cannot be read as a table of records: {first}") from None
    finally:
        datasets_log.setLevel(level)
    wrapped = _wrapped_records(records, file) if builder == "json" else None
    if wrapped:
        raise DataError(wrapped)
    return records


def load_split(
    source: SourceConfig,
    split: str,
    key: str,
    task_seed: int = 0,
    task_noise: float = 0.1,
    required: bool = True,
) -> Split | None:
    """Read one split of a source; `key` (e.g. data.sft) names the config node in errors.

    A split the source does not have is an error if `required`, else None (a single file holds
    only the training split).
    """
    if not source.path:
        raise DataError(
            f"{key}.path: not set; give a file, a directory, a hub dataset id or task:<name>/<kind>"
        )
    location = source.path
    if location.startswith(TASK_SCHEME):
        location = resolve_task_path(location, task_seed, task_noise)
    path = Path(location).expanduser()
    if path.is_file():
        if split != source.split:
            return None
        return Split(_read_file(str(path), key), str(path))
    if path.is_dir():
        files = _split_files(path)
        if split not in files and not required:
            return None
        if split not in files:
            available = ", ".join(files) or "no .jsonl/.json/.parquet/.csv files"
            raise DataError(f"{key}: {path} has no {split!r} split file (found: {available})")
        return Split(_read_file(files[split], key), files[split])
    looks_local = location.startswith((".", "/", "~")) or Path(location).suffix in FILE_BUILDERS
    if looks_local:
        raise DataError(f"{key}.path: {location} does not exist")
    return _load_hub(location, source.name, split, key, required)


def _load_hub(dataset_id: str, name: str | None, split: str, key: str, required: bool) -> Split | None:
    try:
        records = datasets.load_dataset(dataset_id, name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            if not required:
                return None
            raise DataError(
                f"{key}.split: hub dataset {dataset_id!r} has no split {split!r}: {err}"
            ) from None
        raise DataError(f"{key}.path: cannot load hub dataset {dataset_id!r}: {err}") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"{key}.path: cannot load hub dataset {dataset_id!r} (offline, or no such dataset?): {first}"
        ) from None
    return Split(records, f"{dataset_id}[{split}]")


def apply_columns(
    records: datasets.Dataset, columns: dict[str, str], key: str, origin: str
) -> datasets.Dataset:
    """Rename the file's columns to canonical names as `columns` maps them (canonical -> file column)."""
    if not columns:
        return records
    missing = [column for column in columns.values() if column not in records.column_names]
    if missing:
        raise DataError(
            f"{key}.columns: {origin} has no column {missing[0]!r} (columns: {', '.join(records.column_names)})"
        )
    rename = {file_col: canonical for canonical, file_col in columns.items() if file_col != canonical}
    clashing = [c for c in rename.values() if c in records.column_names and c not in rename]
    if clashing:
        records = records.remove_columns(clashing)
    return records.rename_columns(rename)


def load_source(
    source: SourceConfig,
    key: str,
    validation_fraction: float,
    seed: int,
    task_seed: int,
    task_noise: float,
    check_columns: Callable[[list[str], str], object] | None = None,
) -> dict[str, Split]:
    """Train, validation and (if configured) test splits of a source, columns mapped to canonical names.

    `check_columns(columns, origin)` raises if the records cannot be read as the stage's data; it runs
    before the records are counted, so a file of the wrong shape is named as such however short.
    A source without an eval_split gives validation_fraction of its training prompts to validation
    (see hold_out_prompts).
    """
    train = load_split(source, source.split, key, task_seed, task_noise)
    assert train is not None
    train = Split(apply_columns(train.records, source.columns, key, train.origin), train.origin)
    if check_columns is not None:
        check_columns(train.records.column_names, train.origin)
    splits = {"train": train}
    validation = None
    if source.eval_split:
        validation = load_split(source, source.eval_split, key, task_seed, task_noise, required=False)
    if validation is not None:
        splits["validation"] = _mapped(validation, source, key)
    else:
        splits["train"], splits["validation"] = hold_out_prompts(train, validation_fraction, seed, key)
    if source.test_split:
        test = load_split(source, source.test_split, key, task_seed, task_noise, required=False)
        if test is not None:
            splits["test"] = _mapped(test, source, key)
    if source.max_samples is not None and len(splits["train"].records) > source.max_samples:
        kept = splits["train"].records.select(range(source.max_samples))
        splits["train"] = Split(kept, splits["train"].origin)
    for name, split in splits.items():
        if len(split.records) == 0:
            raise DataError(f"{key}: {split.origin} has no records ({name} split)")
    return splits


def _mapped(split: Split, source: SourceConfig, key: str) -> Split:
    return Split(apply_columns(split.records, source.columns, key, split.origin), split.origin)


def hold_out_prompts(train: Split, fraction: float, seed: int, key: str) -> tuple[Split, Split]:
    """(train, validation): `fraction` of the distinct prompts, with all their records, held out.

    Cut by prompt, not by record: preference files hold several pairs per prompt, and a record-level
    cut would put most held-out prompts in training too, so validation would measure recall. Records
    are shuffled (seeded), as the training split's order is what max_samples keeps the head of.
    """
    records = train.records
    keys = prompt_keys(records)
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        what = f"{len(records)} records" if len(records) < 2 else f"{len(records)} records of one prompt"
        raise DataError(
            f"{key}: {train.origin} has {what}; need at least 2 distinct prompts to hold some out"
        )
    rng = np.random.default_rng(seed)
    held = min(len(distinct) - 1, max(1, math.ceil(fraction * len(distinct))))
    held_out = {distinct[i] for i in rng.permutation(len(distinct))[:held]}
    order = rng.permutation(len(records)).tolist()
    # Keep each record's position in the file, so errors name the file's row after the split.
    numbered = records.add_column(ROW_COLUMN, list(range(1, len(records) + 1)))
    kept = numbered.select([i for i in order if keys[i] not in held_out])
    validation = numbered.select([i for i in order if keys[i] in held_out])
    return Split(kept, train.origin), Split(
        validation, f"{train.origin} (held-out {fraction:.0%} of prompts)"
    )
