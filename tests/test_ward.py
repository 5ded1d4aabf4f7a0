"""Real ward films without labels (exporter/ward.py): the patient split, and their report in
evaluate-robustness."""

from __future__ import annotations

import json

import pytest

from exporter import robustness
from exporter.ward import patient_split, read_ward
from heartbatch.model import default_model_path


def _ward_folder(tmp_path, data_dir, n=8, per_patient=2):
    """Fixture chest films standing in for ward films, ``per_patient`` films per patient."""
    folder = tmp_path / "ward" / "films"
    folder.mkdir(parents=True)
    for i, png in enumerate(sorted((data_dir / "cxr-ctr").glob("*/png/*.png"))[:n]):
        (folder / f"w{i}.png").symlink_to(png)
    folder.with_suffix(".csv").write_text("file,patient,view\n" + "".join(
        f"w{i}.png,P{i // per_patient},{'AP' if i % 2 else 'PA'}\n" for i in range(n)) + "gone.png,P9,AP\n")
    return folder


def test_patient_split_keeps_each_patient_on_one_side(tmp_path, data_dir):
    films = read_ward(_ward_folder(tmp_path, data_dir, n=16, per_patient=2))
    assert len(films) == 16  # the listed file that is not there is left out
    fit, held = patient_split(films, seed=0)
    assert fit and held and len(fit) + len(held) == 16
    assert not {f.patient for f in fit} & {f.patient for f in held}
    again = patient_split(list(reversed(films)), seed=0)  # the order of the files does not matter
    assert sorted(f.key for f in again[0]) == sorted(f.key for f in fit)
    assert {f.patient for f in patient_split(films, seed=1)[0]} != {f.patient for f in fit}


def test_read_ward_says_what_is_missing(tmp_path):
    (tmp_path / "films").mkdir()
    with pytest.raises(ValueError, match="films.csv beside it"):
        read_ward(tmp_path / "films")
    (tmp_path / "films.csv").write_text("name,who\nx.png,A\n")
    with pytest.raises(ValueError, match="columns file and patient"):
        read_ward(tmp_path / "films")


def test_evaluate_robustness_reports_ward_films_by_reason(tmp_path, data_dir, capsys):
    out = tmp_path / "robust.json"
    assert robustness.main([str(default_model_path()), "--data", str(data_dir / "cxr-ctr"),
                            "--sets", "clean", "--ward", str(_ward_folder(tmp_path, data_dir)),
                            "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "ward films, patients held out (seed 0)" in printed and "patients fitted on" in printed
    ward = json.loads(out.read_text())["ward"]
    assert sum(row["n"] for row in ward.values()) == 8
    for row in ward.values():  # chest films: measured, and every flag or refusal has its reason counted
        assert row["refused"] + row["measured"] == row["n"]
        assert sum(n for reason, n in row["reasons"].items() if reason.startswith("refused")) == row["refused"]
        assert row["flagged"] <= sum(n for reason, n in row["reasons"].items() if reason.startswith("flagged"))


def test_evaluate_robustness_adds_up_the_corrupted_sets(tmp_path, data_dir, capsys):
    """One line for the corrupted sets together (what the flag catches and costs) and the flags by reason."""
    out = tmp_path / "robust.json"
    assert robustness.main([str(default_model_path()), "--data", str(data_dir / "cxr-ctr"),
                            "--sets", "clean", "whiteout", "text", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    sets = json.loads(out.read_text())["sets"]
    total = {k: sets["whiteout"]["counts"][k] + sets["text"]["counts"][k] for k in sets["text"]["counts"]}
    n = sets["whiteout"]["n"] + sets["text"]["n"]
    assert total["refused"] + total["off_0.05"] + total["within_0.05"] == n
    assert (f"corrupted sets together: {n} films, refused {total['refused']}; off by more than 0.05: "
            f"{total['off_0.05']}, flagged {total['caught_0.05']}") in printed
    for reason, count in sets["clean"]["reasons"].items():
        assert f"{count:4d}  flagged (clean): {reason}" in printed
