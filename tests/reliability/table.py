"""The README's Reliability table, one row per hostile case of issue 14, written from what the cases do.

Each case is a test somewhere under ``tests/`` (the one place it lives) that crafts its input, runs
the real CLI or function, asserts the contract (exit status, one line naming the file, nothing else
lost) and then calls `record` with the outcome it observed, paths replaced by placeholders (`shape`).
`record` fails the test when the README row says anything else, so the table cannot drift from
behaviour; ``python -m tests.reliability --write-readme`` runs the cases and rewrites the table.

A row may gather several parts (the parameters of one test, or several tests of one case): each part
is checked on its own and the row joins them in `CASES` order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN, END = "<!-- reliability-table -->", "<!-- /reliability-table -->"
HEADER = ("| Item | Case | Outcome | Test |", "|---|---|---|---|")
PART_SEP = "<br>"
# Set by the writer: each `record` writes its outcome under this folder instead of checking it.
ROWS_ENV = "LUMBAR_RELIABILITY_ROWS"
REWRITE = "python -m tests.reliability --write-readme"


@dataclass(frozen=True)
class Case:
    key: str
    item: str  # the Build item(s)
    case: str  # what was fed in (README "Case" column)
    tests: tuple[str, ...]  # pytest node ids (file::function) that run it and record its outcome
    parts: tuple[str, ...] = ("",)  # the part names recorded, in row order
    slow: bool = False  # recorded only by `make test-slow`


_H = "tests/dicom/test_hostile_dicom.py::"
_C = "tests/data/test_hostile_cache.py::"
_V = "tests/data/test_hostile_csv.py::"
_E = "tests/cli/test_hostile_errors.py::"
_S = "tests/runtime/test_hostile_serving.py::"
_R = "tests/reliability/test_reliability.py::"
_Q = "tests/runtime/test_foreign_anatomy.py::"

CASES = (
    Case(
        "bombs",
        "1",
        "Deflate bomb (1 GiB inflated), 65535 x 65535 sparse header, 2 GiB padded file, read under a "
        "1 GiB RLIMIT_AS",
        (_H + "test_bombs_stay_under_a_memory_cap",),
    ),
    Case(
        "counts",
        "1",
        "More slices in a series / series in a study / files in a study than the limits",
        (_H + "test_slices_series_and_files_are_counted_before_reading",),
    ),
    Case(
        "predict-bad-file",
        "1, 6, 8",
        "`predict --study` on a study holding one hostile file",
        (_R + "test_predict_grades_a_study_past_one_hostile_file",),
        parts=("bomb", "giant", "frames", "spacing", "slope"),
    ),
    Case(
        "prepare-hostile",
        "1, 2, 4",
        "`prepare` over a deflate bomb, a bad NumberOfFrames and a study folder linked out of the data",
        (_C + "test_prepare_cli_goes_on_past_bombs_and_links",),
    ),
    Case(
        "links",
        "2",
        "Symbolic links leaving a study (a series folder, a file, a link to /etc)",
        (_H + "test_links_leaving_the_study_are_not_followed",),
    ),
    Case(
        "submission-ids",
        "2, 3, 4",
        "`predict --data --submission` with a `../../` study id, a `=HYPERLINK(...)` folder, a study "
        "folder linked out of the data and a study without sagittal series",
        ("tests/runtime/test_predict.py::test_submission_for_a_test_folder_skips_bad_studies",),
    ),
    Case(
        "csv-bom",
        "3",
        "CSVs saved by Excel (UTF-8 BOM, CRLF)",
        (_V + "test_bom_and_crlf_read_like_the_plain_files",),
    ),
    Case(
        "csv-duplicates",
        "3",
        "A study row twice in train.csv / train_grades.csv",
        (_V + "test_a_duplicate_study_row_names_both_lines",),
        parts=("train.csv", "train_grades.csv"),
    ),
    Case(
        "csv-formulas",
        "3",
        "Cells a spreadsheet would run (`=`, `+`, `-`, `@`, tab, CR) in a CSV the project writes",
        (_V + "test_formula_cells_are_written_as_text",),
    ),
    Case(
        "prepare-exception",
        "4",
        "One study raises MemoryError, another ValueError, inside `prepare`",
        (_C + "test_any_exception_of_one_study_is_recorded_and_the_batch_goes_on",),
    ),
    Case(
        "prepare-all-skipped",
        "4",
        "`prepare` where every study is unreadable",
        (_C + "test_every_study_skipped_still_writes_the_report_the_error_names",),
    ),
    Case(
        "evaluate-bad-study",
        "4",
        "`evaluate` over a data folder holding a study whose every file is unreadable",
        ("tests/cli/test_cli.py::test_evaluate_goes_on_past_a_bad_study",),
    ),
    Case(
        "prepare-unreadable",
        "4, 8",
        "`prepare` with one study folder unreadable (mode 000)",
        (_E + "test_an_unreadable_study_costs_only_that_study",),
    ),
    Case(
        "killed-prepare",
        "5",
        "`prepare` killed (SIGKILL) while re-preparing a cache",
        (_C + "test_a_killed_re_prepare_leaves_the_old_cache_whole",),
        parts=("0", "2"),
    ),
    Case(
        "damaged-shard",
        "5",
        "A truncated shard; a shard with one byte flipped",
        (_C + "test_a_truncated_shard_is_found_and_the_cache_rebuilt", _C + "test_a_flipped_byte_is_found"),
        parts=("truncated", "flipped"),
    ),
    Case(
        "killed-export",
        "5",
        "`export` killed (SIGKILL) with a staging folder, with its SavedModel written, just after publishing",
        ("tests/export/test_hostile_export.py::test_a_killed_export_leaves_no_partial_version",),
        parts=("staging", "saved_model", "published"),
        slow=True,
    ),
    Case(
        "stale-variants",
        "5",
        "A second export beside version 1's TFLite files and a killed export's temporary file",
        (
            "tests/export/test_export.py::test_publish_tflite_replaces_this_models_variants_and_leaves_nothing_stale",
        ),
    ),
    Case(
        "geometry-refused",
        "6",
        "PixelSpacing 1e-6 or 1e6 mm, ImagePositionPatient 1e300 or 20 m away, RescaleSlope 0",
        (_H + "test_implausible_header_values_are_refused",),
        parts=("spacing-small", "spacing-large", "position-1e300", "position-20m", "slope"),
    ),
    Case(
        "geometry-warned",
        "6",
        "Slices at duplicated positions; a single-slice sagittal series",
        (_R + "test_duplicate_positions_and_a_single_slice_are_warned_in_predictions",),
    ),
    Case(
        "coronal",
        "6, 11",
        'A coronal lumbar series described as "Sagittal T2" (in its header; in the descriptions CSV; '
        "coronal pixels behind a sagittal ImageOrientationPatient)",
        (_R + "test_a_coronal_series_described_as_sagittal_is_not_graded",),
        parts=("header", "csv", "content"),
    ),
    Case(
        "rest-slow",
        "7",
        "REST server sending a byte every 0.1 s (body; headers that never end), 1 s deadline",
        (_S + "test_rest_call_ends_at_its_deadline_however_slow_the_server",),
        parts=("body", "headers"),
    ),
    Case(
        "huge-answers",
        "7",
        "Answers over the size cap: REST declared 2 GiB, REST streamed, gRPC",
        (
            _S + "test_rest_declared_huge_answer_is_refused_unread",
            _S + "test_rest_streamed_huge_answer_is_cut_at_the_cap",
            _S + "test_grpc_answer_over_the_cap_is_refused",
        ),
        parts=("declared", "streamed", "grpc"),
    ),
    Case(
        "grpc-load",
        "7",
        "1,000 gRPC calls from 16 threads, the server restarted after the 500th answer",
        (_S + "test_grpc_load_with_a_restart_midway",),
    ),
    Case(
        "os-errors",
        "5, 8",
        "`picture --out` under a file, at a folder, in a read-only folder, on a full disk (RLIMIT_FSIZE)",
        (
            _E + "test_output_under_a_file_is_one_line",
            _E + "test_output_that_is_a_folder_is_one_line",
            _E + "test_an_unwritable_output_folder_is_one_line",
            _E + "test_a_full_disk_leaves_no_png",
        ),
        parts=("under-file", "folder", "read-only", "full-disk"),
    ),
    Case(
        "fuzz",
        "9",
        "Seeded random mutations of DICOM and CSV input (the fast suite's bounded run)",
        ("tests/fuzz/test_fuzz.py::test_seeded_mutations_raise_only_one_line_bad_input_errors",),
    ),
    Case(
        "model-files",
        "10",
        "`.keras` files: a Lambda layer, an unknown class, not a lumbar-tf model, not a zip",
        tuple(
            "tests/models/test_hostile_models.py::" + t
            for t in (
                "test_a_lambda_layer_is_refused",
                "test_an_unknown_class_is_refused",
                "test_a_foreign_model_is_refused",
                "test_garbage_is_one_line",
            )
        ),
        parts=("lambda", "unknown", "foreign", "garbage"),
    ),
    Case(
        "qc-levels",
        "11",
        "Level positions reversed, collapsed, 5 mm apart, outside the view, zig-zag",
        ("tests/runtime/test_quality.py::test_implausible_level_positions_are_flagged",),
        parts=("reversed", "collapsed", "5 mm apart", "outside the view", "zig-zag"),
    ),
    Case(
        "qc-images",
        "11",
        "Noise, a checkerboard, a blank image as the localiser view",
        ("tests/runtime/test_quality.py::test_image_checks_tell_texture_from_noise_and_patterns",),
        parts=("noise", "checkerboard", "blank"),
    ),
    Case(
        "foreign-anatomy",
        "11",
        "A head, a knee, an abdominal cross-section, a phantom's axial series, each typed Sagittal T2",
        (_Q + "test_another_body_part_is_flagged_end_to_end",),
        parts=("head", "knee", "abdomen", "mistyped_axial"),
    ),
    Case(
        "foreign-rates",
        "11",
        "Rates: 40 foreign studies (10 of each kind) against 40 realistic and 12 centred phantoms",
        (_Q + "test_false_alarm_and_detection_rates",),
        parts=("tiny model, 64 px", "fallback, 192 px"),
        slow=True,
    ),
)
BY_KEY = {case.key: case for case in CASES}


def shape(text: str, **paths) -> str:
    """``text`` with each path given replaced by ``<name>``, longest first (so a file inside a
    named folder keeps its own name)."""
    for name, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(path), f"<{name}>")
    return text


def render_row(case: Case, outcomes: dict[str, str]) -> str:
    outcome = PART_SEP.join(outcomes[p] for p in case.parts)
    tests = ", ".join(sorted({f"`{t.split('::')[0].removeprefix('tests/')}`" for t in case.tests}))
    if case.slow:
        tests += " (slow test, `make test-slow`)"
    return f"| {case.item} | {case.case} | {outcome} | {tests} |"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def readme_rows(text: str | None = None) -> list[str]:
    """The table lines between the markers (header excluded)."""
    text = README.read_text() if text is None else text
    if BEGIN not in text or END not in text:
        raise AssertionError(f"README.md has no {BEGIN} ... {END} block: run {REWRITE}")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()
    return block[len(HEADER) :]


def readme_outcomes(text: str | None = None) -> dict[str, dict[str, str]]:
    """``{case key: {part: outcome}}`` as the README says, rows matched to `CASES` by their Case
    column (a row with the wrong number of parts is left out)."""
    by_case = {cells[1]: cells[2] for cells in map(_cells, readme_rows(text)) if len(cells) == 4}
    found = {}
    for case in CASES:
        parts = by_case.get(case.case, "").split(PART_SEP)
        if case.case in by_case and len(parts) == len(case.parts):
            found[case.key] = dict(zip(case.parts, parts, strict=True))
    return found


def record(key: str, outcome: str, part: str = "") -> None:
    """The outcome a case observed: written for the table writer (`ROWS_ENV`), else checked
    against the README row, failing the test when they differ."""
    case = BY_KEY[key]
    assert part in case.parts, (key, part)
    assert PART_SEP not in outcome and "|" not in outcome.replace("\\|", "") and "\n" not in outcome, outcome
    folder = os.environ.get(ROWS_ENV)
    if folder:
        Path(folder, f"{key}={re.sub(r'[^A-Za-z0-9_.-]', '_', part)}.txt").write_text(outcome)
        return
    said = readme_outcomes().get(key, {}).get(part)
    assert said == outcome, (
        f"README Reliability row {key!r}{f' ({part})' if part else ''} says {said!r} but the case gives "
        f"{outcome!r}: run {REWRITE}"
    )


def collected(folder) -> dict[str, dict[str, str]]:
    """What `record` wrote under ``folder``: ``{key: {part: outcome}}``."""
    found: dict[str, dict[str, str]] = {}
    for case in CASES:
        for part in case.parts:
            path = Path(folder, f"{case.key}={re.sub(r'[^A-Za-z0-9_.-]', '_', part)}.txt")
            if path.exists():
                found.setdefault(case.key, {})[part] = path.read_text()
    return found


def render_table(outcomes: dict[str, dict[str, str]]) -> str:
    return "\n".join([*HEADER, *(render_row(case, outcomes[case.key]) for case in CASES)])


def replace_table(text: str, table: str) -> str:
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{table}\n{END}{after}"
