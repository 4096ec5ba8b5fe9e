"""Assertions shared by the test modules."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from datamodules.batch import DatasetError


def raises_naming(fn: Callable[[], object], fragment: str, problem: str) -> DatasetError:
    """Call ``fn``, expect a :class:`DatasetError` whose message contains ``fragment`` (the file or
    key it names) and matches the regex ``problem``, and return the error."""
    with pytest.raises(DatasetError) as info:
        fn()
    msg = str(info.value)
    assert fragment in msg, msg
    assert re.search(problem, msg), msg
    return info.value
