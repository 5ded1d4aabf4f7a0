"""Split files that cannot be used, for every command that reads one (train, evaluate, quantize)."""

from __future__ import annotations

import pytest


def bad_splits(known: str) -> list:
    """``(file content or None for a missing file, what the message must say)`` cases; ``known``
    is an image key that exists in the test's data."""
    return [
        pytest.param("{not json", "not JSON", id="not-json"),
        pytest.param("[1, 2]", "not a split file", id="a-list"),
        pytest.param(f'{{"train": ["{known}"]}}', "not a split file", id="no-val"),
        pytest.param(f'{{"train": "{known}", "val": []}}', "not a split file", id="train-a-string"),
        pytest.param('{"train": [], "val": [3]}', "must be strings", id="numbers"),
        pytest.param(f'{{"train": ["{known}"], "val": ["{known}"]}}', "in both 'train' and 'val'", id="overlap"),
        pytest.param(f'{{"train": ["{known}"], "val": ["other/NOPE.png"]}}', "not in the data", id="unknown-image"),
        pytest.param(None, "cannot read the split file", id="missing-file"),
    ]


def write_split(path, content: str | None):
    """The split file of a case (``None``: the file does not exist)."""
    if content is not None:
        path.write_text(content)
    return path


def assert_refused(code: int, capsys, split, says: str):
    """Exit 2 with the file and what is wrong on stderr, never an internal error."""
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 2, err
    assert str(split) in err and says in err, err
    assert "internal error" not in err
    return captured
