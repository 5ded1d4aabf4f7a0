"""The CTR summaries: every number in report.summary.json recomputed
independently from report.csv (pandas/numpy), and the Markdown summary.

The intensity model gives each image a CTR of 0.3 + 0.5 x its preprocessed mean,
so images of different brightness give a spread of CTRs, some above and some
below the threshold.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicom_factory import brightness_image, to_bits, truncate, write_dicom
from heartbatch import cli

UID = "1.2.826.0.1.3680043.9.7777."
#: file name -> (study, view, bright fraction, spacing?); fraction None: not measured
STUDIES = {
    # PA and AP in one study: PA wins although AP sorts first by name and has the higher CTR
    "s1_ap.dcm": ("1", "AP", 0.92, True),
    "s1_pa.dcm": ("1", "PA", 0.50, True),
    # AP only
    "s2_ap.dcm": ("2", "AP", 0.85, False),
    # PA next to a lateral (skipped) of the same study
    "s3_pa.dcm": ("3", "PA", 0.35, False),
    "s3_lat.dcm": ("3", "LL", 0.35, True),
    # AP next to a truncated copy (error) of the same study
    "s4_ap.dcm": ("4", "AP", 0.66, True),
    "s4_trunc.dcm": ("4", "PA", None, True),
    # single PA studies across the CTR range
    "s5_pa.dcm": ("5", "PA", 0.97, True),
    "s6_pa.dcm": ("6", "PA", 0.15, False),
    "s7_pa.dcm": ("7", "PA", 0.75, True),
    # no ViewPosition: measured, but neither PA nor AP
    "s8_noview.dcm": ("8", None, 0.55, True),
    # another AP-only study
    "s9_ap.dcm": ("9", "AP", 0.25, True),
}
THRESHOLDS = (0.5, 0.45)



@pytest.fixture(scope="module")
def studies_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    for seed, (name, (study, view, fraction, spaced)) in enumerate(sorted(STUDIES.items())):
        pixels = brightness_image(fraction if fraction is not None else 0.5, seed)
        kwargs = dict(study_uid=UID + study, view_position=view, pixel_spacing=(0.14, 0.14) if spaced else None)
        if fraction is None:
            truncate(write_dicom(root / name, to_bits(pixels, 16), bits_stored=16, **kwargs), 0.6)
        else:
            write_dicom(root / name, pixels, **kwargs)
    (root / "README.txt").write_text("export notes\n")
    (root / "notes.txt").write_text("more notes\n")
    return root


@pytest.fixture(scope="module", params=THRESHOLDS, ids=lambda t: f"threshold{t}")
def run(request, studies_dir, intensity_model, tmp_path_factory):
    threshold = request.param
    out = tmp_path_factory.mktemp("summary") / "report.csv"
    code = cli.main(["run", str(studies_dir), "--out", str(out), "--model", str(intensity_model),
                     "--workers", "0", "--threads", "1", "--quiet", "--batch-size", "4",
                     "--ctr-threshold", str(threshold)])
    assert code == 0
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    summary = json.loads((out.parent / "report.summary.json").read_text(encoding="utf-8"))
    return {"threshold": threshold, "frame": frame, "summary": summary, "out": out}


# --- independent recomputation -------------------------------------------------------

def ctr_values(frame: pd.DataFrame) -> np.ndarray:
    ok = frame[(frame["status"] == "ok") & (frame["ctr"] != "")]
    return ok["ctr"].astype(float).to_numpy()


def histogram(values: np.ndarray) -> list[int]:
    """20 bins of 0.05 on [0, 1], last bin closed, values outside clipped to the end bins."""
    counts = [0] * 20
    for v in values:
        v = min(max(float(v), 0.0), 1.0)
        index = min(int(math.floor(v * 20 + 1e-9)), 19)
        counts[index] += 1
    return counts


def expected_distribution(values: np.ndarray, threshold: float) -> dict:
    s = pd.Series(values, dtype=float)
    q1, median, q3 = s.quantile(0.25), s.quantile(0.5), s.quantile(0.75)
    return {"n": len(s), "mean": s.mean(), "median": median, "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": s.min(), "max": s.max(), "enlarged": int((s > threshold).sum()),
            "enlarged_fraction": float((s > threshold).mean()), "counts": histogram(values)}


def assert_distribution(actual: dict, values: np.ndarray, threshold: float, where: str) -> None:
    expected = expected_distribution(values, threshold)
    assert actual["n"] == expected["n"], where
    assert actual["enlarged"] == expected["enlarged"], where
    for key in ("mean", "median", "q1", "q3", "iqr", "min", "max", "enlarged_fraction"):
        assert actual[key] == pytest.approx(expected[key], abs=2e-6), (where, key)
    assert actual["histogram"]["counts"] == expected["counts"], where
    edges = actual["histogram"]["edges"]
    assert len(edges) == 21 and edges[0] == 0 and edges[-1] == 1
    np.testing.assert_allclose(np.diff(edges), 0.05, atol=1e-9)


VIEW_RANK = {"PA": 0, "AP": 1}


def expected_studies(frame: pd.DataFrame) -> dict[str, dict]:
    """Per study: the PA image if there is one, else the AP image (else any)."""
    ok = frame[(frame["status"] == "ok") & (frame["ctr"] != "")]
    out = {}
    for study, group in ok.groupby("study_instance_uid"):
        ranked = sorted(group.itertuples(), key=lambda r: VIEW_RANK.get(r.view_position, 2))
        best = ranked[0]
        out[study] = {"path": best.path, "view_position": best.view_position, "ctr": float(best.ctr),
                      "images": len(group)}
    return out


# --- the data set is what the tests think it is ---------------------------------------

def test_fixture_covers_the_cases(run):
    frame = run["frame"]
    assert len(frame) == len(STUDIES) + 2
    names = frame["path"].map(lambda p: Path(p).name)
    status = dict(zip(names, frame["status"]))
    assert status["s3_lat.dcm"] == "skipped" and status["s4_trunc.dcm"] == "error"
    assert status["README.txt"] == status["notes.txt"] == "skipped"
    values = ctr_values(frame)
    threshold = run["threshold"]
    assert 0 < (values > threshold).sum() < len(values), "thresholds must split the CTRs"
    assert len(set(np.round(values, 3))) == len(values)


# --- files -----------------------------------------------------------------------------

def test_counts_by_status(run):
    frame, files = run["frame"], run["summary"]["files"]
    assert files["total"] == len(frame)
    assert files["by_status"] == {s: int((frame["status"] == s).sum()) for s in ("ok", "skipped", "error")}


def test_counts_by_reason(run):
    frame, files = run["frame"], run["summary"]["files"]
    rejected = frame[frame["status"] != "ok"]
    expected = Counter(zip(rejected["status"], rejected["reason"]))
    actual = {(r["status"], r["reason"]): r["count"] for r in files["by_reason"]}
    assert len(actual) == len(files["by_reason"]), "a (status, reason) pair listed twice"
    assert actual == dict(expected)
    assert sum(actual.values()) == len(rejected)


def test_threshold_and_model_ids(run):
    summary, frame = run["summary"], run["frame"]
    assert summary["threshold"] == pytest.approx(run["threshold"])
    assert summary["model_ids"] == sorted(set(frame["model_id"]) - {""})
    assert len(summary["model_ids"]) == 1


# --- CTR distribution --------------------------------------------------------------

def test_ctr_distribution(run):
    assert_distribution(run["summary"]["ctr"], ctr_values(run["frame"]), run["threshold"], "ctr")


def test_ctr_distribution_by_view(run):
    """AP magnifies the heart, so views are reported separately."""
    frame, by_view, threshold = run["frame"], run["summary"]["by_view"], run["threshold"]
    ok = frame[(frame["status"] == "ok") & (frame["ctr"] != "")]
    for view in ("PA", "AP"):
        values = ok.loc[ok["view_position"] == view, "ctr"].astype(float).to_numpy()
        assert_distribution(by_view[view], values, threshold, view)
    others = [key for key in by_view if key not in ("PA", "AP")]
    assert len(others) == 1, by_view.keys()  # the image without ViewPosition
    values = ok.loc[ok["view_position"] == "", "ctr"].astype(float).to_numpy()
    assert_distribution(by_view[others[0]], values, threshold, others[0])
    assert sum(d["n"] for d in by_view.values()) == len(ok)


def test_enlarged_column_agrees_with_threshold(run):
    frame, threshold = run["frame"], run["threshold"]
    ok = frame[frame["status"] == "ok"]
    expected = np.where(ok["ctr"].astype(float) > threshold, "true", "false")
    assert list(ok["enlarged"]) == list(expected)
    assert (frame.loc[frame["status"] != "ok", "enlarged"] == "").all()


# --- per study ----------------------------------------------------------------------

def test_per_study_choice_prefers_pa_over_ap(run):
    studies, frame = run["summary"]["studies"], run["frame"]
    expected = expected_studies(frame)
    items = {item["study_instance_uid"]: item for item in studies["items"]}
    assert studies["n"] == len(expected) == len(items) == 9
    for uid, exp in expected.items():
        item = items[uid]
        assert item["path"] == exp["path"], uid
        assert item["view_position"] == exp["view_position"], uid
        assert item["ctr"] == pytest.approx(exp["ctr"], abs=2e-6), uid
        assert item["enlarged"] == (exp["ctr"] > run["threshold"]), uid
        assert item["images"] == exp["images"], uid
    assert Path(items[UID + "1"]["path"]).name == "s1_pa.dcm"
    assert items[UID + "1"]["images"] == 2
    assert Path(items[UID + "3"]["path"]).name == "s3_pa.dcm"   # lateral skipped, not chosen
    assert Path(items[UID + "4"]["path"]).name == "s4_ap.dcm"   # truncated PA is an error
    assert items[UID + "2"]["view_position"] == "AP"


def test_per_study_dates(run):
    items = run["summary"]["studies"]["items"]
    assert all(item["study_date"] == "20240115" for item in items)


def test_study_ctr_distribution(run):
    chosen = np.array([s["ctr"] for s in expected_studies(run["frame"]).values()])
    assert_distribution(run["summary"]["studies"]["ctr"], chosen, run["threshold"], "studies")


# --- the threshold ------------------------------------------------------------------

def test_ctr_threshold_changes_enlarged_counts(studies_dir, intensity_model, tmp_path_factory):
    """--ctr-threshold moves images and studies from normal to enlarged."""
    enlarged = {}
    for threshold in THRESHOLDS:
        out = tmp_path_factory.mktemp("thr") / "report.csv"
        assert cli.main(["run", str(studies_dir), "--out", str(out), "--model", str(intensity_model),
                         "--workers", "0", "--threads", "1", "--quiet",
                         "--ctr-threshold", str(threshold)]) == 0
        summary = json.loads((out.parent / "report.summary.json").read_text())
        frame = pd.read_csv(out, dtype=str, keep_default_na=False)
        values = ctr_values(frame)
        assert summary["ctr"]["enlarged"] == int((values > threshold).sum())
        enlarged[threshold] = (summary["ctr"]["enlarged"], summary["studies"]["ctr"]["enlarged"],
                               (frame["enlarged"] == "true").sum())
    low, high = min(THRESHOLDS), max(THRESHOLDS)
    assert all(a > b for a, b in zip(enlarged[low], enlarged[high])), enlarged


# --- Markdown -----------------------------------------------------------------------

def test_markdown_summary_mentions_the_counts(run):
    md_path = run["out"].parent / "report.summary.md"
    assert md_path.is_file()
    text = md_path.read_text(encoding="utf-8")
    frame, summary = run["frame"], run["summary"]
    assert str(len(frame)) in text
    for status in ("ok", "skipped", "error"):
        count = int((frame["status"] == status).sum())
        assert re.search(rf"\b{status}\b\D{{0,3}}\b{count}\b", text), (status, count)
    assert f"{summary['studies']['n']}" in text
    assert "AP" in text and "PA" in text
    for reason in set(frame.loc[frame["status"] != "ok", "reason"]):
        assert reason.replace("|", "/") in text


# --- measurements flagged for review --------------------------------------------------

#: ok rows a person should check, with their reasons: s1_pa leaves study 1 to its AP image,
#: s2_ap and s7_pa are their studies' only measurements.
FLAGS = {
    "s1_pa.dcm": "low confidence (CTR ± 0.031)",
    "s2_ap.dcm": "implausible boxes: heart wider than thorax",
    "s7_pa.dcm": "mirrored film; low confidence (CTR ± 0.052)",
}
#: per reason, numbers in parentheses dropped and joined reasons counted each
FLAG_REASONS = {"low confidence": 2, "implausible boxes: heart wider than thorax": 1, "mirrored film": 1}


@pytest.fixture(scope="module")
def reviewed(run, tmp_path_factory):
    """The run's report with three ok rows flagged for review (and scores on every ok row)."""
    from heartbatch.report.summary import write_summaries

    frame = run["frame"].copy()
    names = frame["path"].map(lambda p: Path(p).name)
    ok = frame["status"] == "ok"
    frame.loc[ok, "chest_score"] = "0.970"
    frame.loc[ok, "uncertainty"] = "0.0100"
    frame.loc[ok, "review"] = "false"
    for name, reason in FLAGS.items():
        frame.loc[names == name, ["review", "review_reason"]] = ["true", reason]
    assert (frame["review"] == "true").sum() == len(FLAGS) and (frame.loc[~ok, "review"] == "").all()
    out = tmp_path_factory.mktemp("reviewed") / "report.csv"
    frame.to_csv(out, index=False)
    _, _, summary = write_summaries(out, run["threshold"])
    return {**run, "frame": frame, "summary": summary, "out": out,
            "unflagged": frame[frame["review"] != "true"], "flagged": frame[frame["review"] == "true"]}


def test_nothing_flagged_nothing_counted(run):
    summary = run["summary"]
    assert summary["review"] == {"n": 0, "reasons": {}, "decided": {"accepted": 0, "corrected": 0, "rejected": 0},
                                 "rejected_reasons": {}}
    assert all(d["review"] == 0 for d in summary["by_view"].values())
    assert summary["studies"]["review_only"] == [] and all(s["review"] == 0 for s in summary["studies"]["items"])


def test_flagged_rows_are_counted_not_in_the_statistics(reviewed):
    summary, threshold = reviewed["summary"], reviewed["threshold"]
    assert_distribution(summary["ctr"], ctr_values(reviewed["unflagged"]), threshold, "ctr")
    assert summary["review"]["n"] == len(reviewed["flagged"]) == len(FLAGS)
    assert summary["review"]["reasons"] == FLAG_REASONS
    assert summary["ctr"]["n"] + summary["review"]["n"] == int((reviewed["frame"]["status"] == "ok").sum())


def test_files_counts_stay_complete(reviewed):
    frame, files = reviewed["frame"], reviewed["summary"]["files"]
    assert files["total"] == len(frame)
    assert files["by_status"] == {s: int((frame["status"] == s).sum()) for s in ("ok", "skipped", "error")}


def test_flagged_rows_by_view(reviewed):
    by_view, threshold = reviewed["summary"]["by_view"], reviewed["threshold"]
    unflagged = reviewed["unflagged"][reviewed["unflagged"]["status"] == "ok"]
    flagged = reviewed["flagged"]
    for view, key in (("PA", "PA"), ("AP", "AP"), ("", next(k for k in by_view if k not in ("PA", "AP")))):
        values = unflagged.loc[unflagged["view_position"] == view, "ctr"].astype(float).to_numpy()
        assert_distribution(by_view[key], values, threshold, key)
        assert by_view[key]["review"] == int((flagged["view_position"] == view).sum()), key
    assert sum(d["review"] for d in by_view.values()) == len(FLAGS)


def test_per_study_chooses_among_unflagged_and_lists_review_only_studies(reviewed):
    studies, frame = reviewed["summary"]["studies"], reviewed["frame"]
    expected = expected_studies(reviewed["unflagged"])
    ok = frame[(frame["status"] == "ok") & (frame["ctr"] != "")]
    items = {item["study_instance_uid"]: item for item in studies["items"]}
    assert set(items) == set(expected) and studies["n"] == len(expected) == 7
    for uid, exp in expected.items():
        group = ok[ok["study_instance_uid"] == uid]
        assert (items[uid]["path"], items[uid]["ctr"]) == (exp["path"], pytest.approx(exp["ctr"], abs=2e-6)), uid
        assert items[uid]["images"] == len(group), "images counts every measured image"
        assert items[uid]["review"] == int((group["review"] == "true").sum()), uid
    assert Path(items[UID + "1"]["path"]).name == "s1_ap.dcm", "the flagged PA is not chosen"
    assert items[UID + "1"]["review"] == 1
    only = {s["study_instance_uid"]: s for s in studies["review_only"]}
    assert set(only) == {UID + "2", UID + "7"}, "studies measured only by flagged images"
    for uid, name in ((UID + "2", "s2_ap.dcm"), (UID + "7", "s7_pa.dcm")):
        assert Path(only[uid]["path"]).name == name and only[uid]["review_reason"] == FLAGS[name]
        assert only[uid]["review"] == only[uid]["images"] == 1
    chosen = np.array([s["ctr"] for s in expected.values()])
    assert_distribution(studies["ctr"], chosen, reviewed["threshold"], "studies")


def test_markdown_shows_the_flagged_count_and_reasons(reviewed):
    text = (reviewed["out"].parent / "report.summary.md").read_text(encoding="utf-8")
    assert f"{len(FLAGS)} measurements flagged for review (not in the CTR statistics)" in text
    for reason, count in FLAG_REASONS.items():
        assert f"| {reason} | {count} |" in text
    only = text[text.index("measured only by images flagged for review"):]
    assert UID + "2" in only and UID + "7" in only and FLAGS["s2_ap.dcm"] in only
