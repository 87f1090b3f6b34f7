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
import json
import sys

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
    from fvlm_core.errors import DataError

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


def label_table(df, text_columns, id_column):
    """DataFrame: ``id_column`` + the 18 labels (0/1) for every row of ``df``; also counts of
    empty and non-English reports."""
    import warnings

    import pandas as pd

    from fvlm_core.findings import CTRATE_LABELS
    from fvlm_core.reports.labels import extract_labels
    from fvlm_core.reports.sentences import looks_english

    texts = df[text_columns].fillna("").astype(str).agg(" ".join, axis=1).str.strip()
    rows, empty, non_english = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted and reported once below
        for text in texts:
            if not text:
                empty += 1
            elif not looks_english(text):
                non_english += 1
            rows.append(extract_labels(text, on_bad_report="ignore"))
    out = pd.DataFrame(rows, columns=list(CTRATE_LABELS), index=df.index).astype(int)
    out.insert(0, id_column, df[id_column].values)
    return out, empty, non_english


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from fvlm_core.atomic import atomic_path
    from fvlm_core.errors import DataError, InputError
    from fvlm_core.findings import CTRATE_LABELS
    from fvlm_core.reports.labels import score_labels

    if not args.out and not args.score:
        raise InputError("nothing to do: pass --out LABELS.csv and/or --score")
    try:
        df = pd.read_csv(args.reports)
    except FileNotFoundError:
        raise DataError(f"reports CSV {args.reports} does not exist") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{args.reports}: not a readable CSV ({exc})") from exc
    if df.columns.empty:
        raise DataError(f"{args.reports}: the CSV has no columns")
    id_column = args.id_column or str(df.columns[0])
    if id_column not in df.columns:
        raise DataError(
            f"id column {id_column!r} not in {args.reports} (columns: {', '.join(map(str, df.columns))})"
        )
    text_columns = _text_columns(list(df.columns), args.text_column)
    if args.score:
        missing = [c for c in CTRATE_LABELS if c not in df.columns]
        if missing:
            raise DataError(
                f"--score needs the 18 CT-RATE label columns in {args.reports}; missing: {', '.join(missing)}"
            )
    table, empty, non_english = label_table(df, text_columns, id_column)
    if empty or non_english:
        print(
            f"fvlm labels: warning: {empty} empty and {non_english} non-English report(s) got all-0 labels",
            file=sys.stderr,
        )
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
        print(f"wrote {len(table)} rows x {len(CTRATE_LABELS)} labels to {args.out}", file=sys.stderr)
    if args.score:
        gold = df[list(CTRATE_LABELS)].fillna(0).astype(int)
        scores = score_labels(gold, table)
        scores["text_columns"] = text_columns
        print(json.dumps(scores, indent=2))
    return 0
