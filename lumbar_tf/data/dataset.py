"""Dataset index (RSNA CSV layout), TFRecord cache of model-ready views, and tf.data pipelines.

Flow: CSVs -> `DatasetIndex` (labels, coordinates, series descriptions per study) ->
`prepare_cache` (decode DICOM once in a process pool, write sharded TFRecords of views, level
positions and grades, plus a skipped-studies report) -> `localizer_dataset` / `grader_dataset`
(stream the cache: parse in parallel, cache in memory, shuffle, augment, batch, prefetch).
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import PreprocessConfig, config_to_dict, preprocess_config_from_dict
from lumbar_tf.core.errors import DatasetError, one_line
from lumbar_tf.core.ids import check_study_id, study_sort_key
from lumbar_tf.core.io import write_csv_atomic, write_json_atomic
from lumbar_tf.data.slice_offsets import accepts, resolve_offsets
from lumbar_tf.dicom.reader import DicomError, read_series_descriptions, read_study
from lumbar_tf.preprocess import build_views, source_px_to_view_norm


@dataclass
class StudyLabels:
    """Everything the CSVs say about one study."""

    study_id: str
    grades: np.ndarray  # [5 conditions, 5 levels] grade codes
    fine_grades: bool  # grades came from train_grades.csv (0-3), not only RSNA strings
    coordinates: list[dict] = field(default_factory=list)  # rows of train_label_coordinates.csv


@dataclass
class DatasetIndex:
    """The label files of one RSNA-layout folder, read and checked."""

    root: Path
    images_dir: Path
    studies: dict[str, StudyLabels]
    descriptions: dict[str, dict[str, str]]
    problems: dict[str, str]  # study_id -> why its labels are unusable

    @property
    def study_ids(self) -> list[str]:
        return sorted(self.studies, key=int)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every data row; a UTF-8 BOM (Excel) and CRLF line ends are fine."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return [(reader.line_num, row) for row in reader]
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a valid CSV ({exc})") from None


def _refuse_duplicates(path: Path, rows: list[tuple[int, dict]]) -> None:
    """One row per study in the label files: a second one would silently replace the first."""
    first: dict[str, int] = {}
    for line, row in rows:
        sid = str(row.get("study_id", "")).strip()
        if sid in first:
            raise DatasetError(f"{path}: study_id {sid} appears twice (lines {first[sid]} and {line})")
        first[sid] = line


def _grades_from_row(row: dict, parse, path: Path) -> np.ndarray:
    grades = np.full((L.N_CONDITIONS, L.N_LEVELS), L.UNKNOWN, dtype=np.int64)
    for ci, condition in enumerate(L.CONDITIONS):
        for li, level in enumerate(L.LEVELS):
            column = L.column_name(condition, level)
            try:
                grades[ci, li] = parse(row.get(column))
            except L.LabelError as exc:
                raise DatasetError(f"{path.name}: column {column}: {exc}") from None
    return grades


def read_index(data_dir: str | Path, split: str = "train") -> DatasetIndex:
    """Read `{split}.csv`, `{split}_grades.csv`, coordinates and series descriptions.

    A study whose rows hold an unknown severity, condition or level, or whose study_id is not a
    plain integer, is recorded in ``problems`` (and skipped later) instead of failing the dataset.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    images_dir = root / f"{split}_images"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found")
    descriptions_path = root / f"{split}_series_descriptions.csv"
    descriptions = read_series_descriptions(descriptions_path) if descriptions_path.exists() else {}

    studies: dict[str, StudyLabels] = {}
    problems: dict[str, str] = {}

    def add_problem(study_id: str, reason: str) -> None:
        problems.setdefault(study_id, reason)

    label_path = root / f"{split}.csv"
    grades_path = root / f"{split}_grades.csv"
    coords_path = root / f"{split}_label_coordinates.csv"
    if label_path.exists():
        rows = _read_csv(label_path)
        _refuse_duplicates(label_path, rows)
        for _, row in rows:
            raw_id = str(row.get("study_id", ""))
            try:
                sid = check_study_id(raw_id, label_path.name)
                studies[sid] = StudyLabels(
                    sid, _grades_from_row(row, L.parse_rsna_severity, label_path), False
                )
            except DatasetError as exc:
                add_problem(raw_id, str(exc))
    if grades_path.exists():
        rows = _read_csv(grades_path)
        _refuse_duplicates(grades_path, rows)
        for _, row in rows:
            raw_id = str(row.get("study_id", ""))
            try:
                sid = check_study_id(raw_id, grades_path.name)
                fine = _grades_from_row(row, L.parse_grade, grades_path)
            except DatasetError as exc:
                add_problem(raw_id, str(exc))
                continue
            # The seed's fine grades win over the RSNA strings where the study has them.
            studies[sid] = StudyLabels(sid, fine, True)
    if coords_path.exists():
        for _, row in _read_csv(coords_path):
            raw_id = str(row.get("study_id", ""))
            try:
                sid = check_study_id(raw_id, coords_path.name)
                entry = {
                    "series_id": str(row["series_id"]).strip(),
                    "instance_number": int(float(row["instance_number"])),
                    "condition": L.parse_condition_title(row["condition"]),
                    "level": L.parse_level_title(row["level"]),
                    "x": float(row["x"]),
                    "y": float(row["y"]),
                }
            except (KeyError, TypeError, ValueError) as exc:
                reason = exc.args[0] if isinstance(exc, DatasetError | L.LabelError) else f"bad value ({exc})"
                add_problem(raw_id, f"{coords_path.name}: {reason}")
                continue
            if sid in studies:
                studies[sid].coordinates.append(entry)
    for sid in list(studies):
        if sid in problems:
            del studies[sid]
    return DatasetIndex(root, images_dir, studies, descriptions, problems)


# === Preparing one study ===


def _level_points(study, grid, labels: StudyLabels) -> tuple[np.ndarray, np.ndarray]:
    """Level centres in normalised view space from the coordinates file.

    The spinal canal point is the level centre; where it is absent, the mean of the other
    conditions' points projected onto the sagittal plane stands in for it. Points on a series
    that was set aside (a repeat of one description) count too: every series of the study maps
    onto the same patient grid.
    """
    by_series = {s.series_id: s for s in [*study.extra, *study.series.values()]}
    canal: dict[int, np.ndarray] = {}
    other: dict[int, list[np.ndarray]] = {}
    for row in labels.coordinates:
        series = by_series.get(row["series_id"])
        if series is None:
            continue
        index = next(
            (i for i, s in enumerate(series.slices) if s.instance_number == row["instance_number"]), None
        )
        if index is None:
            continue
        # Label pixels are the file's; a resampled slice (another size, same field) has other ones.
        file_xy = series.slices[index].file_px_to_px((row["x"], row["y"]))
        xy = np.asarray(source_px_to_view_norm(series, index, file_xy, grid), dtype=np.float32)
        level = L.LEVELS.index(row["level"])
        if row["condition"] == "spinal_canal_stenosis":
            canal[level] = xy
        else:
            other.setdefault(level, []).append(xy)
    level_xy = np.zeros((L.N_LEVELS, 2), np.float32)
    present = np.zeros((L.N_LEVELS,), np.float32)
    for level in range(L.N_LEVELS):
        if level in canal:
            level_xy[level], present[level] = canal[level], 1.0
        elif level in other:
            level_xy[level], present[level] = np.mean(other[level], axis=0), 1.0
    return level_xy, present


def prepare_study(
    images_dir: Path,
    labels: StudyLabels | None,
    study_id: str,
    descriptions: dict,
    cfg: PreprocessConfig,
) -> dict:
    """Decode one study into model-ready views plus its targets (raises DicomError/DatasetError).

    The series the coordinates file names win where several share a description, so a repeat
    series never takes the labels' place. The views (and their grid) are built exactly as at
    inference (`preprocess.build_views`), from the image alone: a study lacking a series is kept
    with that view zeroed (the localiser's view from another sagittal series) and a warning, as
    inference does, so the model learns that a zero view means "not imaged" (with the view dropout
    of `_drop_views`); only a study without any sagittal series fails (DicomError).
    """
    study_dir = images_dir / check_study_id(study_id, str(images_dir))
    wanted = {spec.series_description for spec in cfg.views} | _axial_descriptions(cfg)
    labelled = {row["series_id"] for row in labels.coordinates} if labels is not None else None
    study = read_study(study_dir, descriptions.get(study_id), only=wanted, prefer=labelled)
    views, grid, view_instances, warnings = build_views(study, cfg)
    if labels is not None:
        level_xy, present = _level_points(study, grid, labels)
        grades, fine = labels.grades, labels.fine_grades
    else:
        level_xy = np.zeros((L.N_LEVELS, 2), np.float32)
        present = np.zeros((L.N_LEVELS,), np.float32)
        grades, fine = np.full((L.N_CONDITIONS, L.N_LEVELS), L.UNKNOWN), False
    extra = _axial_record(study, grid, view_instances, level_xy, present, cfg) if cfg.axial else {}
    return {
        **extra,
        "study_id": study_id,
        "views": views,
        "level_xy": level_xy,
        "level_present": present,
        "grades": np.asarray(grades, np.int64),
        "fine_grades": fine,
        "warnings": warnings,
    }


# === Axial crops in the cache ===


def _axial_descriptions(cfg: PreprocessConfig) -> set[str]:
    return {cfg.axial.series_description} if cfg.axial is not None else set()


def axial_cache_geometry(cfg: PreprocessConfig) -> tuple[int, int, float]:
    """``(channels, size px, crop mm)`` of the axial crops the cache stores per level: the model's
    crop (``crop_size`` px of ``axial.crop_mm``) plus ``slice_shift`` slices on each side and an
    in-plane margin of ``shift_mm``, so tf.data can shift both at random every epoch (one cache)."""
    a = cfg.axial
    margin = int(np.ceil(a.shift_mm / a.crop_mm * cfg.crop_size))
    size = cfg.crop_size + 2 * margin
    return a.channels + 2 * a.slice_shift, size, a.crop_mm * size / cfg.crop_size


def _axial_record(study, grid, view_instances, level_xy, present, cfg: PreprocessConfig) -> dict:
    """The axial crops around the labelled level points (`lumbar_tf.axial`, the same geometry as
    inference), with the cache's margins; a level without a label point or axial coverage is zeros."""
    from lumbar_tf import axial

    channels, size, crop_mm = axial_cache_geometry(cfg)
    points = axial.level_points_patient(study, grid, view_instances, level_xy, cfg)
    points[np.asarray(present) < 0.5] = np.nan
    series = axial.axial_series(study)
    projections = axial.project_levels(points, series, snap_mm=axial.DISC_SNAP_MM)
    crops = axial.axial_crops(
        series, projections, cfg, crop_mm=crop_mm, size=size, neighbours=(channels - 1) // 2
    )
    return {"axial": crops, "axial_valid": np.array([p.covered for p in projections], np.float32)}


def _axial_features(record: dict) -> dict:
    import tensorflow as tf

    return {
        "axial": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[np.ascontiguousarray(record["axial"], np.uint8).tobytes()])
        ),
        "axial_valid": tf.train.Feature(float_list=tf.train.FloatList(value=record["axial_valid"])),
    }


def _axial_spec(cfg: PreprocessConfig) -> dict:
    import tensorflow as tf

    return {
        "axial": tf.io.FixedLenFeature([], tf.string),
        "axial_valid": tf.io.FixedLenFeature([L.N_LEVELS], tf.float32),
    }


def _axial_parsed(ex: dict, cfg: PreprocessConfig) -> dict:
    import tensorflow as tf

    channels, size, _ = axial_cache_geometry(cfg)
    crops = tf.reshape(tf.io.decode_raw(ex["axial"], tf.uint8), [L.N_LEVELS, size, size, channels])
    return {"axial": crops, "axial_valid": ex["axial_valid"]}


def axial_training_crops(stored, cfg: PreprocessConfig, training: bool):
    """Stored axial crops ``[5, size, size, channels]`` -> the model's ``[5, S, S, 2n+1]`` float32.

    Training moves each level's centre slice by up to ``slice_shift`` slices and its crop in-plane by
    up to ``shift_mm`` (uniform), and zeroes a level's crop at the ``dropout`` rate (what a level no
    axial stack covers looks like). Otherwise: the centre slice and crop, exactly as `axial.axial_crops`
    takes them at inference.
    """
    import tensorflow as tf

    a = cfg.axial
    size, stored_channels = int(stored.shape[1]), int(stored.shape[-1])  # margins as stored
    s = cfg.crop_size
    margin = (size - s) / 2
    slices = (stored_channels - a.channels) // 2
    if training:
        shift = tf.random.uniform([L.N_LEVELS], -a.slice_shift, a.slice_shift + 1, dtype=tf.int32)
        limit = min(a.shift_mm / (a.crop_mm / s), margin)
        offset = tf.random.uniform([L.N_LEVELS, 2], -limit, limit)
    else:
        shift = tf.zeros([L.N_LEVELS], tf.int32)
        offset = tf.zeros([L.N_LEVELS, 2])
    index = slices + shift[:, None] + tf.range(a.channels)[None]  # [5, 2n+1]
    slab = tf.gather(tf.cast(stored, tf.float32), index, axis=3, batch_dims=1)
    # crop_and_resize: box corners land on pixel centres 0 and size-1 of the stored crop.
    y1 = (margin + offset[:, 1]) / (size - 1)
    x1 = (margin + offset[:, 0]) / (size - 1)
    span = (s - 1) / (size - 1)
    boxes = tf.stack([y1, x1, y1 + span, x1 + span], axis=-1)
    crops = tf.image.crop_and_resize(slab, boxes, tf.range(L.N_LEVELS), [s, s])
    if training and a.dropout > 0:
        keep = tf.cast(tf.random.uniform([L.N_LEVELS]) >= a.dropout, tf.float32)
        crops = crops * keep[:, None, None, None]
    return crops


# === TFRecord cache ===

MANIFEST = "manifest.json"
SKIPPED = "skipped_studies.csv"


def _serialize(record: dict, view_names: Iterable[str]) -> bytes:
    import tensorflow as tf

    def _bytes(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "study_id": _bytes(record["study_id"].encode()),
        "level_xy": tf.train.Feature(float_list=tf.train.FloatList(value=record["level_xy"].ravel())),
        "level_present": tf.train.Feature(float_list=tf.train.FloatList(value=record["level_present"])),
        "grades": tf.train.Feature(int64_list=tf.train.Int64List(value=record["grades"].ravel())),
        "fine_grades": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record["fine_grades"])])),
    }
    for name in view_names:
        features[f"view/{name}"] = _bytes(np.ascontiguousarray(record["views"][name], np.uint8).tobytes())
    if "axial" in record:
        features.update(_axial_features(record))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _prepare_task(task: tuple):
    """One study (in a worker process) -> (study_id, record or None, error or None).

    With a hand-over folder the views go through a file there and the record carries its path:
    the result pipe would cost the parent about 1 ms of CPU a study for ~0.2 MB of views, which on
    a 2-core machine comes out of the workers' share (page-cache file I/O costs a tenth of that).
    """
    images_dir, labels, study_id, descriptions, cfg, handover = task
    try:
        record = prepare_study(images_dir, labels, study_id, {study_id: descriptions}, cfg)
        if handover is not None:
            path = handover / f"{study_id}.views"
            with open(path, "wb") as handle:
                for name in cfg.view_names:
                    handle.write(np.ascontiguousarray(record["views"][name], np.uint8).data)
            record["views"] = path
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001  (one study, whatever its failure, never stops the batch)
        return study_id, None, _study_failure(exc, images_dir / str(study_id))
    return study_id, record, None


def _study_failure(exc: BaseException, study_dir: Path) -> str:
    """One line for skipped_studies.csv: our own errors name their file; any other exception (a
    ValueError from a corrupt header value, a MemoryError from a huge image, ...) is named with the
    study folder and its class, so a bug of ours is still told from bad input."""
    if isinstance(exc, (DicomError, DatasetError, L.LabelError)):
        return one_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or one_line(exc)}"
    return f"{study_dir}: {exc.__class__.__name__}: {one_line(exc)}"


def _take_views(path: Path, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """The views a worker handed over in ``path`` (which is then removed)."""
    data = np.fromfile(path, np.uint8)
    path.unlink()
    views = data.reshape(len(cfg.view_names), cfg.view_size, cfg.view_size, 3)
    return dict(zip(cfg.view_names, views))


def _start_pool(workers: int):
    """A process pool for decoding, started before anything heavy is imported or read.

    forkserver, preloaded with this module: the server starts once per process (in the
    background while the caller imports TensorFlow and reads the CSVs) and forks each worker
    from an interpreter that never imported TensorFlow. Plain fork would be faster still but can
    deadlock once TensorFlow's thread pools exist (evaluate and export run prepare after
    training); spawn pays ~0.3 s of imports per worker on every run. Threads would not help:
    header parsing holds the GIL.
    """
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ctx.Pool(workers, initializer=_init_worker)


def _init_worker() -> None:
    # One OpenCV thread per worker: the pool already uses every core.
    import cv2

    cv2.setNumThreads(1)


def prepare_cache(
    data_dir: str | Path,
    cache_dir: str | Path,
    cfg: PreprocessConfig,
    *,
    split: str = "train",
    workers: int | None = None,
    shards: int = 8,
    progress: bool = True,
    study_ids: list[str] | None = None,
) -> dict:
    """Decode every study once and write sharded TFRecords; returns the manifest.

    Decoding runs in a process pool (``workers`` processes, default one per available core;
    1 = in this process): pydicom, header parsing and the pylibjpeg plugins hold the GIL, so
    threads (or tf.data's parallel map over py_function) would not use the second core.
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = _start_pool(workers) if workers > 1 else None
    try:
        return _prepare_cache(data_dir, cache_dir, cfg, pool, split, shards, progress, study_ids)
    finally:
        if pool is not None:
            pool.terminate()


def select_studies(index: DatasetIndex, split: str, study_ids=None) -> tuple[list[str], dict[str, str]]:
    """``(study ids to decode, {study_id: reason} of those skipped)``: one rule for the process pool
    and the Beam pipeline (`data.beam_prepare`)."""
    wanted = (
        study_ids
        if study_ids is not None
        else sorted(
            {p.name for p in index.images_dir.iterdir() if p.is_dir()} | set(index.studies),
            key=study_sort_key,
        )
    )
    skipped: dict[str, str] = {}
    todo = []
    images_root = index.images_dir.resolve()
    for sid in wanted:
        folder = index.images_dir / str(sid)
        if sid in index.problems:
            skipped[sid] = index.problems[sid]
        elif folder.is_symlink() and images_root not in folder.resolve().parents:
            skipped[sid] = f"{folder}: study folder is a link that leaves the images folder; refused"
        elif split == "train" and sid not in index.studies:
            skipped[sid] = f"{sid}: no row in {split}.csv"
        else:
            todo.append(sid)
    for sid, reason in index.problems.items():
        skipped.setdefault(sid, reason)
    return todo, skipped


def _prepare_cache(data_dir, cache_dir, cfg, pool, split, shards, progress, study_ids) -> dict:
    import tensorflow as tf
    from tqdm import tqdm

    index = read_index(data_dir, split)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    todo, skipped = select_studies(index, split, study_ids)
    # Learned channel offsets are resolved once, before any view is built (`data.slice_offsets`).
    mapper = (lambda f, tasks: pool.imap(f, tasks, chunksize=2)) if pool is not None else map
    cfg, offsets_report = resolve_offsets(
        index.images_dir, index.studies, index.descriptions, todo, cfg, mapper=mapper
    )

    view_names = cfg.view_names
    n_shards = max(1, min(shards, len(todo)))
    # New shards get a fresh name and a ".partial" suffix (which `study_dataset` never reads) until
    # the manifest naming them is in place: a prepare killed at any point leaves the old cache whole.
    generation = os.urandom(4).hex()
    names = [f"shard-{generation}-{i:03d}.tfrecord" for i in range(n_shards)] if todo else []
    partial = [cache / (name + ".partial") for name in names]
    writers = [tf.io.TFRecordWriter(str(path)) for path in partial]
    kept: list[str] = []
    warnings: dict[str, list[str]] = {}
    handover = None
    if pool is not None and todo:
        handover = cache / ".handover"
        shutil.rmtree(handover, ignore_errors=True)
        handover.mkdir()
    # Each task carries only its own study's labels and series descriptions.
    tasks = [
        (index.images_dir, index.studies.get(sid), sid, index.descriptions.get(sid, {}), cfg, handover)
        for sid in todo
    ]
    results = pool.imap(_prepare_task, tasks, chunksize=2) if pool is not None else map(_prepare_task, tasks)
    bar = tqdm(total=len(todo), desc="prepare", unit="study", disable=not progress)
    try:
        for sid, record, error in results:
            bar.update(1)
            if error is None:
                try:
                    if handover is not None:
                        record["views"] = _take_views(record["views"], cfg)
                    serialized = _serialize(record, view_names)
                except Exception as exc:  # noqa: BLE001  (one study never stops the batch)
                    error = _study_failure(exc, index.images_dir / sid)
            if error is not None:
                skipped[sid] = error
                continue
            writers[len(kept) % n_shards].write(serialized)
            kept.append(sid)
            if record["warnings"]:
                warnings[sid] = record["warnings"]
    except BaseException:
        for writer in writers:
            writer.close()
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if handover is not None:
            shutil.rmtree(handover, ignore_errors=True)
    for writer in writers:
        writer.close()
    shard_entries = []
    for name, path in zip(names, partial):
        if not kept:
            path.unlink(missing_ok=True)
            continue
        shard_entries.append({"file": name, **_shard_fingerprint(path)})
        path.replace(cache / name)

    manifest = publish_cache(cache, split, kept, shard_entries, cfg, skipped, warnings, offsets_report)
    if not todo:
        raise DatasetError(f"{data_dir}: no usable studies ({len(skipped)} skipped, see {cache / SKIPPED})")
    if not kept:
        raise DatasetError(
            f"{data_dir}: no study could be read ({len(skipped)} skipped, see {cache / SKIPPED})"
        )
    return manifest


def publish_cache(
    cache: Path, split: str, kept, shard_entries, cfg, skipped, warnings, slice_offsets=None
) -> dict:
    """Write the skipped-studies report, then swap in the manifest naming the new shard generation
    (from here on the new shards count) and remove the shards it does not name. Shared by the
    process pool and the Beam pipeline. ``cfg`` is the resolved preprocessing (learned offsets in
    place) and ``slice_offsets`` the report of `slice_offsets.resolve_offsets`."""
    _write_skipped(cache / SKIPPED, skipped)
    manifest = {
        "split": split,
        "study_ids": kept,
        "n_shards": len(shard_entries),
        "shards": shard_entries,
        "view_names": list(cfg.view_names),
        "preprocess": config_to_dict(cfg),
        "skipped": skipped,
        "warnings": warnings,
        "slice_offsets": slice_offsets or {},
    }
    write_json_atomic(cache / MANIFEST, manifest)
    _remove_unlisted_shards(cache, {entry["file"] for entry in shard_entries})
    return manifest


def _shard_fingerprint(path: Path) -> dict:
    """Size and CRC-32 of a shard file, stored in the manifest and checked before every read."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def _remove_unlisted_shards(cache: Path, listed: set[str]) -> None:
    """Shards the manifest does not name: an older generation, or one a killed prepare left."""
    for path in cache.glob("shard-*.tfrecord*"):
        if path.name not in listed and not path.name.endswith(".partial"):
            path.unlink(missing_ok=True)


def _write_skipped(path: Path, skipped: dict[str, str]) -> None:
    rows = sorted(skipped.items(), key=lambda kv: study_sort_key(kv[0]))
    write_csv_atomic(path, ["study_id", "reason"], rows)


def load_manifest(cache_dir: str | Path, cfg: PreprocessConfig | None = None) -> dict:
    """Read a cache's manifest; refuse a cache built with other preprocessing or with damaged shards.

    A ``cfg`` view with ``offsets: labels`` accepts the offsets the cache learned for it
    (`slice_offsets.accepts`); ``manifest["preprocess"]`` holds them (`manifest_preprocess`).

    Every shard the manifest names must have the size and CRC-32 it was written with; shards it
    does not name (left by a prepare killed before its manifest swap) are removed so that
    `study_dataset` never reads them. A damaged cache has its manifest moved aside to
    ``manifest.json.damaged``: then it is no longer a prepared cache, and `train`/`evaluate`
    prepare it again instead of training on a truncated shard.
    """
    cache = Path(cache_dir)
    path = cache / MANIFEST
    if not path.exists():
        raise DatasetError(f"{cache_dir}: not a prepared cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        preprocess, shards = manifest["preprocess"], manifest["shards"]
        listed = {str(entry["file"]) for entry in shards}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _set_aside(path)
        raise DatasetError(
            f"{path}: unreadable or from an older version ({exc.__class__.__name__}); "
            "the cache will be prepared again"
        ) from None
    if cfg is not None and not accepts(preprocess, cfg, manifest.get("slice_offsets", {})):
        raise DatasetError(f"{cache_dir}: cache was prepared with other preprocessing settings")
    for entry in shards:
        shard = cache / entry["file"]
        problem = None
        if "/" in entry["file"] or not shard.is_file():
            problem = "is missing"
        elif shard.stat().st_size != entry["bytes"]:
            problem = f"has {shard.stat().st_size} of {entry['bytes']} bytes (truncated)"
        elif _shard_fingerprint(shard)["crc32"] != entry["crc32"]:
            problem = "is corrupt (CRC-32 differs)"
        if problem:
            _set_aside(path)
            raise DatasetError(f"{shard}: shard {problem}; the cache will be prepared again")
    _remove_unlisted_shards(cache, listed)
    if not manifest["study_ids"]:
        raise DatasetError(f"{cache_dir}: the cache holds no study (see {cache / SKIPPED})")
    return manifest


def manifest_preprocess(manifest: dict) -> PreprocessConfig:
    """The preprocessing a cache was built with, learned offsets resolved: what a model trained on
    it must carry."""
    return preprocess_config_from_dict(manifest["preprocess"])


def _set_aside(manifest_path: Path) -> None:
    os.replace(manifest_path, manifest_path.with_name(manifest_path.name + ".damaged"))


# === tf.data ===


def _parse_fn(view_names, view_size, cfg: PreprocessConfig | None = None):
    import tensorflow as tf

    axial = cfg is not None and cfg.axial is not None
    spec = {
        "study_id": tf.io.FixedLenFeature([], tf.string),
        "level_xy": tf.io.FixedLenFeature([L.N_LEVELS * 2], tf.float32),
        "level_present": tf.io.FixedLenFeature([L.N_LEVELS], tf.float32),
        "grades": tf.io.FixedLenFeature([L.N_CONDITIONS * L.N_LEVELS], tf.int64),
        "fine_grades": tf.io.FixedLenFeature([], tf.int64),
    }
    for name in view_names:
        spec[f"view/{name}"] = tf.io.FixedLenFeature([], tf.string)
    if axial:
        spec.update(_axial_spec(cfg))

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        views = {
            name: tf.reshape(tf.io.decode_raw(ex[f"view/{name}"], tf.uint8), [view_size, view_size, 3])
            for name in view_names
        }
        return {
            "study_id": ex["study_id"],
            "views": views,
            "level_xy": tf.reshape(ex["level_xy"], [L.N_LEVELS, 2]),
            "level_present": ex["level_present"],
            "grades": tf.reshape(ex["grades"], [L.N_CONDITIONS, L.N_LEVELS]),
            **(_axial_parsed(ex, cfg) if axial else {}),
        }

    return parse


def study_dataset(cache_dir: str | Path, cfg: PreprocessConfig, study_ids: Iterable[str] | None = None):
    """Parsed studies from the cache (optionally only some study ids), cached in memory."""
    import tensorflow as tf

    manifest = load_manifest(cache_dir, cfg)
    files = sorted(str(p) for p in Path(cache_dir).glob("shard-*.tfrecord"))
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    ds = ds.map(_parse_fn(manifest["view_names"], cfg.view_size, cfg), num_parallel_calls=tf.data.AUTOTUNE)
    if study_ids is not None:
        keep = tf.constant(sorted(str(s) for s in study_ids))
        ds = ds.filter(lambda r: tf.reduce_any(tf.equal(keep, r["study_id"])))
    return ds.cache().with_options(_without_autotune_thread())


def _without_autotune_thread():
    """tf.data options that every pipeline built on `study_dataset` inherits: autotuning off.

    The autotuner gives each iterator a thread that re-tunes on a timer whose period doubles up to
    seconds, and deleting the iterator waits for that thread's next wake-up. Keras drops a validation
    iterator every epoch (the garbage collector frees it during the next epoch's steps), so on 2
    cores the demo's grader sat idle for 2-3 s in a third to a half of its epochs
    (benchmarks/train_epochs_results.md). Without autotuning the parallel stages keep their default
    parallelism untuned; every epoch then ran at ~1.95 of the 2 cores, so these small pipelines lost
    nothing by it.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def load_studies(cache_dir, cfg: PreprocessConfig, study_ids=None) -> dict[str, np.ndarray]:
    """All (selected) studies of a cache as numpy arrays, sorted by study id (for evaluation)."""
    items = list(study_dataset(cache_dir, cfg, study_ids).as_numpy_iterator())
    items.sort(key=lambda r: study_sort_key(r["study_id"].decode()))
    out = {
        "study_id": [r["study_id"].decode() for r in items],
        "views": {n: np.stack([r["views"][n] for r in items]) for n in cfg.view_names},
        "level_xy": np.stack([r["level_xy"] for r in items]),
        "level_present": np.stack([r["level_present"] for r in items]),
        "grades": np.stack([r["grades"] for r in items]),
    }
    if cfg.axial is not None:  # the stored crops, with their margins (`axial_training_crops`)
        out["axial"] = np.stack([r["axial"] for r in items])
        out["axial_valid"] = np.stack([r["axial_valid"] for r in items])
    return out


def _photometric_augmenter(seed: int):
    """Keras 3 core augmentation layers, run inside tf.data (not inside the model)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomContrast(0.25, seed=seed),
            keras.layers.RandomBrightness(0.15, value_range=(0.0, 255.0), seed=seed + 1),
        ],
        name="photometric_augmentation",
    )


# Grid placement jitter of the localiser's training views, as fractions of the view: the view grid is
# placed by `preprocess.find_spine`, whose error on phantoms is about 25 mm (median) / 50 mm (p90)
# of L5/S1 (docs/architecture.md), so training shifts the field by up to 0.15 x 200 mm = 30 mm and
# zooms 0.85-1.2 (body size). Done here, not at prepare time: a new draw every epoch, one cache.
GRID_SHIFT = 0.15
GRID_SCALE = (0.85, 1.2)
# Per study, the chance that the localiser's view is replaced by the second sagittal view (what
# `preprocess.view_series` does for a study without Sagittal T2/STIR), and (grader) that the second
# view is zeroed (what a study without it gets).
VIEW_DROPOUT = 0.1


def _drop_views(views: dict, names, rate: float, zero_second: bool):
    """View dropout on one study's views: with probability ``rate`` the first view becomes the
    second one (a missing Sagittal T2 seen through T1); with ``zero_second`` and probability
    ``rate`` more the second view is zeros. Needs two views with content; else unchanged."""
    import tensorflow as tf

    if rate <= 0 or len(names) < 2:
        return views
    first, second = names[0], names[1]
    u = tf.random.uniform([])
    has_second = tf.reduce_any(views[second] > 0)
    out = dict(views)
    out[first] = tf.where((u < rate) & has_second, views[second], views[first])
    if zero_second:
        out[second] = tf.where((u >= rate) & (u < 2 * rate), tf.zeros_like(views[second]), views[second])
    return out


def localizer_dataset(
    cache_dir,
    cfg: PreprocessConfig,
    study_ids,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    view_dropout: float = VIEW_DROPOUT,
):
    """(view, y_true) batches for the localiser; y_true [5, 3] = (x, y, present).

    Training adds a random zoom/shift of the whole view (`GRID_SHIFT`, `GRID_SCALE`: the spine
    finder's error; coordinates moved with it, levels pushed out of the view masked), view
    substitution (`VIEW_DROPOUT`: the T1 midline in place of the T2 one) and photometric
    augmentation.
    """
    import tensorflow as tf

    view = cfg.localizer_view
    size = cfg.view_size
    ds = study_dataset(cache_dir, cfg, study_ids)
    if training:
        ds = ds.shuffle(512, seed=seed, reshuffle_each_iteration=True).repeat()

    def to_example(r):
        views = _drop_views(r["views"], cfg.view_names, view_dropout, False) if training else r["views"]
        image = tf.cast(views[view], tf.float32)
        xy = r["level_xy"]
        if training:
            scale = tf.random.uniform([], *GRID_SCALE)
            shift = tf.random.uniform([2], -GRID_SHIFT, GRID_SHIFT)
            x0 = 0.5 - scale / 2 + shift[0]
            y0 = 0.5 - scale / 2 + shift[1]
            box = tf.stack([y0, x0, y0 + scale, x0 + scale])[None]
            # crop_and_resize maps box corners onto pixel centres 0 and H-1.
            image = tf.image.crop_and_resize(image[None], box, [0], [size, size])[0]
            px = (xy * size - 0.5) / (size - 1)  # pixel-centre coordinates in [0, 1]
            px = (px - tf.stack([x0, y0])) / scale
            xy = (px * (size - 1) + 0.5) / size
        present = r["level_present"] * tf.cast(tf.reduce_all((xy > 0.0) & (xy < 1.0), axis=-1), tf.float32)
        return image, tf.concat([xy, present[:, None]], axis=-1)

    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=training)
    if training:
        augment = _photometric_augmenter(seed)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def level_boxes_tf(level_xy, cfg: PreprocessConfig):
    """Crop boxes [..., 4] (y1, x1, y2, x2) around normalised level centres (docs/architecture.md)."""
    import tensorflow as tf

    half = cfg.crop_mm / cfg.spine_crop_mm / 2.0
    x, y = level_xy[..., 0], level_xy[..., 1]
    return tf.stack([y - half, x - half, y + half, x + half], axis=-1)


def grader_dataset(
    cache_dir,
    cfg: PreprocessConfig,
    study_ids,
    *,
    batch_size: int,
    training: bool,
    jitter_mm: float = 0.0,
    seed: int = 0,
    view_dropout: float = VIEW_DROPOUT,
    axial: bool | None = None,
):
    """Per-level (crops, y_true) batches for the grader, cropped around the labelled level points.

    Inputs: one crop per view plus ``level_index``; y_true [5 conditions, 3 thresholds, 2] =
    (targets, mask). Training jitters each crop centre by up to ``jitter_mm`` (the localiser's
    typical error), so the grader learns to read a level that is not perfectly centred, and
    applies view dropout per study (`_drop_views`), so a missing series costs accuracy, not
    correctness. With ``cfg.axial`` (and ``axial`` not False: an ablation may leave it out) the
    axial crops join as input ``cfg.axial.name`` (`axial_training_crops`: slice and in-plane shifts,
    axial dropout).
    """
    import tensorflow as tf

    names = cfg.view_names
    use_axial = cfg.axial is not None and axial is not False
    augmented = names + ((cfg.axial.name,) if use_axial else ())
    ds = study_dataset(cache_dir, cfg, study_ids)
    if training:
        ds = ds.shuffle(512, seed=seed, reshuffle_each_iteration=True).repeat()
    jitter = jitter_mm / cfg.spine_crop_mm

    def encode(grades):
        g = tf.cast(grades, tf.int32)
        known_fine = tf.cast(g >= 0, tf.float32)
        known = tf.cast(g != L.UNKNOWN, tf.float32)
        targets = tf.stack(
            [
                tf.cast(g >= 1, tf.float32) * known_fine,
                tf.cast(g >= 2, tf.float32),
                tf.cast(g >= 3, tf.float32),
            ],
            axis=-1,
        )
        mask = tf.stack([known_fine, known, known], axis=-1)
        return tf.stack([targets * mask, mask], axis=-1)  # [5 cond, 5 level, 3, 2]

    def to_levels(r):
        xy = r["level_xy"]
        if training and jitter > 0:
            xy = xy + tf.random.uniform(tf.shape(xy), -jitter, jitter)
        boxes = level_boxes_tf(xy, cfg)
        views = _drop_views(r["views"], names, view_dropout, True) if training else r["views"]
        crops = {
            n: tf.image.crop_and_resize(
                tf.cast(views[n], tf.float32)[None],
                boxes,
                tf.zeros([L.N_LEVELS], tf.int32),
                [cfg.crop_size, cfg.crop_size],
            )
            for n in names
        }
        y = tf.transpose(encode(r["grades"]), [1, 0, 2, 3])  # [level, cond, 3, 2]
        inputs = dict(crops)
        if use_axial:
            inputs[cfg.axial.name] = axial_training_crops(r["axial"], cfg, training)
        inputs["level_index"] = tf.range(L.N_LEVELS, dtype=tf.int32)
        keep = r["level_present"] > 0.5
        inputs = {k: tf.boolean_mask(v, keep) for k, v in inputs.items()}
        return tf.data.Dataset.from_tensor_slices((inputs, tf.boolean_mask(y, keep)))

    ds = ds.flat_map(to_levels)
    if training:
        ds = ds.shuffle(1024, seed=seed + 7)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        augment = _photometric_augmenter(seed + 11)

        def aug(inputs, y):
            out = {n: augment(inputs[n], training=True) for n in augmented}
            if use_axial:  # a zeroed (not imaged) axial crop stays zeros: brightness would fill it
                name = cfg.axial.name
                imaged = tf.reduce_max(inputs[name], axis=[1, 2, 3], keepdims=True) > 0
                out[name] = out[name] * tf.cast(imaged, out[name].dtype)
            out["level_index"] = inputs["level_index"]
            return out, y

        ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_folds(study_ids: Iterable[str], folds: int, seed: int) -> dict[str, int]:
    """Seeded k-fold assignment by study (a study's levels never straddle train and validation)."""
    ids = sorted((str(s) for s in study_ids), key=study_sort_key)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i]: int(rank % folds) for rank, i in enumerate(order)}


def label_summary(grades: np.ndarray) -> dict:
    """Counts of each grade code per condition (for metadata and the README)."""
    out = {}
    for ci, condition in enumerate(L.CONDITIONS):
        values, counts = np.unique(np.asarray(grades)[:, ci], return_counts=True)
        out[condition] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    return out
