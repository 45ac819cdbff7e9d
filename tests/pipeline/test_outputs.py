"""The one writability check that build and train-sae run before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ConfigError
from app.pipeline.outputs import check_writable_dir


def test_a_folder_to_be_made_is_probed_in_its_nearest_parent_and_nothing_is_left(tmp_path):
    check_writable_dir(tmp_path / "a" / "b", what="the SAE to a/b")
    check_writable_dir(tmp_path, what="the cache")
    assert list(tmp_path.iterdir()) == []  # no folder made, no probe left


def test_refusals_name_the_output_the_blocking_path_and_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        check_writable_dir(blocker / "sae", what=f"the SAE to {blocker / 'sae'}",
                           hint="choose a writable folder with --out")
    assert str(err.value) == (f"cannot write the SAE to {blocker / 'sae'}: {blocker} is not a "
                              "folder; choose a writable folder with --out")
    if Path("/proc/self").is_dir():  # a folder no one can create anything in, even root
        with pytest.raises(ConfigError, match=r"^cannot write the cache /proc/x/cache: /proc is "
                                              r"not writable \(.+\); set SAESCOPE_HOME"):
            check_writable_dir(Path("/proc/x/cache"), what="the cache /proc/x/cache",
                               hint="set SAESCOPE_HOME")
    assert sorted(tmp_path.iterdir()) == [blocker]
