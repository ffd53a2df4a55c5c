"""The suite itself runs in a narrow terminal with a long temporary path (see conftest.py); this keeps it so."""

import os
import tempfile

from conftest import HOSTILE_COLUMNS, HOSTILE_TEMP_CHARS


def test_the_suite_runs_in_a_narrow_terminal() -> None:
    assert os.environ["COLUMNS"] == HOSTILE_COLUMNS


def test_the_suite_runs_with_a_long_temporary_path(tmp_path, request) -> None:
    if request.config.option.basetemp and not str(request.config.option.basetemp).startswith(tempfile.gettempdir()):
        return  # a --basetemp given on the command line is kept as given
    assert len(tempfile.gettempdir()) >= HOSTILE_TEMP_CHARS
    assert len(str(tmp_path)) > HOSTILE_TEMP_CHARS
