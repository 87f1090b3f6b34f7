"""Extract the 18 CT-RATE finding labels from report text (rule-based, negation-aware).

Writes the input's id column and the 18 labels as 0/1 columns named exactly as in CT-RATE.
The text is --text-column (repeatable: columns are joined), else ``report_text``, else, for
CT-RATE's reports CSV (VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
Impressions_EN), Findings_EN + Impressions_EN. With --score and an input that already holds the
18 label columns, prints per-label and macro F1 of the extracted labels against them as JSON.

Examples::

    fvlm labels validation_reports.csv --out validation_labels.csv
    fvlm labels ctrate_reports_labelled_800.csv --score
    fvlm labels reports.csv --text-column Findings_EN --text-column Impressions_EN --id-column VolumeName --out L.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings

from fvlm_core.errors import DataError, InputError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.outputs import OutputPlan
from fvlm_core.reports.labels import extract_labels, score_labels
from fvlm_core.reports.sentences import looks_english

CTRATE_TEXT_COLUMNS = ("Findings_EN", "Impressions_EN")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", help="CSV of reports (one row per report)")
    parser.add_argument(
        "--text-column",
        action="append",
        help="column holding the report text (repeat to join several; default: report_text, "
        "else Findings_EN + Impressions_EN)",
    )
    parser.add_argument("--id-column", help="id column copied to the output (default: the first column)")
    parser.add_argument("--out", help="labels CSV to write (id column + the 18 CT-RATE labels)")
    parser.add_argument(
        "--score",
        action="store_true",
        help="compare with the 18 label columns already in the input; print per-label and macro F1 as JSON",
    )


def _text_columns(columns, requested) -> list[str]:
    if requested:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise DataError(
                f"text column(s) {missing} not in the reports CSV (its columns: {', '.join(map(str, columns))}); "
                "pass --text-column with one of them"
            )
        return list(requested)
    if "report_text" in columns:
        return ["report_text"]
    present = [c for c in CTRATE_TEXT_COLUMNS if c in columns]
    if present:
        return present
    raise DataError(
        f"the reports CSV has no report_text column nor CT-RATE's {', '.join(CTRATE_TEXT_COLUMNS)} "
        f"(its columns: {', '.join(map(str, columns))}); name the text column with --text-column"
    )


def read_csv_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows (column -> cell text) of a CSV file.

    Blank lines are skipped; short rows are padded with ``""``; a header cell left empty (a
    saved index) is named ``Unnamed: <position>``.

    Raises:
        DataError: the file is missing or unreadable, has no header or no rows, repeats a column
            name, or holds a row with more cells than the header.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next((r for r in reader if r), None)
            if header is None:
                raise DataError(f"{path}: the CSV has no columns")
            columns = [c or f"Unnamed: {i}" for i, c in enumerate(header)]
            rows = []
            for cells in reader:
                if not cells:
                    continue
                if len(cells) > len(columns):
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(cells)} cells but the header names "
                        f"{len(columns)} columns; quote cells that hold commas"
                    )
                rows.append(dict(zip(columns, cells + [""] * (len(columns) - len(cells)))))
    except FileNotFoundError:
        raise DataError(f"reports CSV {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: column name(s) {', '.join(repeated)} appear more than once")
    if not rows:
        raise DataError(
            f"{path}: has a header ({', '.join(columns)}) but no rows, so there are no reports to label. "
            "Check that it is the right file: one report per row below the header"
        )
    return columns, rows


def label_table(
    rows: list[dict[str, str]], text_columns: list[str], id_column: str
) -> tuple[list[list[str | int]], int, int]:
    """``[id, 18 labels (0/1)]`` for every row; also counts of empty and non-English reports."""
    table, empty, non_english = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted and reported once below
        for row in rows:
            text = " ".join(row[c] for c in text_columns).strip()
            if not text:
                empty += 1
            elif not looks_english(text):
                non_english += 1
            labels = extract_labels(text, on_bad_report="ignore")
            table.append([row[id_column], *(int(labels[lbl]) for lbl in CTRATE_LABELS)])
    return table, empty, non_english


def gold_labels(rows: list[dict[str, str]], path: str | os.PathLike) -> dict[str, list[int]]:
    """The input's 18 label columns as 0/1 (an empty cell is 0); :class:`DataError` on other values."""

    def value(cell: str, label: str, row: int) -> int:
        try:
            number = float(cell) if cell.strip() else 0.0
        except ValueError:
            number = -1.0
        if number not in (0.0, 1.0):
            raise DataError(f"{path}: row {row}, column {label!r}: {cell!r} is not a 0/1 label")
        return int(number)

    return {lbl: [value(r[lbl], lbl, i) for i, r in enumerate(rows, start=1)] for lbl in CTRATE_LABELS}


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.score:
        raise InputError("nothing to do: pass --out LABELS.csv and/or --score")
    plan = OutputPlan()
    plan.input("REPORTS", args.reports)
    plan.file("--out", args.out, example="labels.csv")
    plan.check()
    columns, rows = read_csv_table(args.reports)
    id_column = args.id_column or columns[0]
    if id_column not in columns:
        raise DataError(f"id column {id_column!r} not in {args.reports} (columns: {', '.join(columns)})")
    text_columns = _text_columns(columns, args.text_column)
    if args.score:
        missing = [c for c in CTRATE_LABELS if c not in columns]
        if missing:
            raise DataError(
                f"--score needs the 18 CT-RATE label columns in {args.reports}; missing: {', '.join(missing)}"
            )
    gold = gold_labels(rows, args.reports) if args.score else None
    table, empty, non_english = label_table(rows, text_columns, id_column)
    if empty or non_english:
        print(
            f"fvlm labels: warning: {empty} empty and {non_english} non-English report(s) got all-0 labels",
            file=sys.stderr,
        )
    if args.out:
        with plan.writing() as staged, open(staged.path("--out"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([id_column, *CTRATE_LABELS])
            writer.writerows(table)
        print(f"wrote {len(table)} rows x {len(CTRATE_LABELS)} labels to {args.out}", file=sys.stderr)
    if gold is not None:
        pred = {lbl: [r[i + 1] for r in table] for i, lbl in enumerate(CTRATE_LABELS)}
        scores = score_labels(gold, pred)
        scores["text_columns"] = text_columns
        print(json.dumps(scores, indent=2))
    return 0
