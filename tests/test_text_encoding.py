"""The package's text files are UTF-8 whatever the process locale: a native library (e.g.
SimpleITK's DICOM writer) can switch a running process to the "C" locale, where Python's
default text encoding is ASCII (and on Windows it is a code page)."""

from __future__ import annotations

import locale
import pytest

from napari_registration.core.files import write_text_atomic


@pytest.fixture
def c_locale():
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
    except locale.Error:  # pragma: no cover - every libc has "C"
        pytest.skip("no C locale")
    if locale.getpreferredencoding(False).lower().replace("-", "") in ("utf8",):
        locale.setlocale(locale.LC_ALL, saved)
        pytest.skip("this Python reads text as UTF-8 in the C locale too (UTF-8 mode)")
    yield
    locale.setlocale(locale.LC_ALL, saved)


def test_text_written_and_read_as_utf8_in_the_c_locale(tmp_path, c_locale):
    path = write_text_atomic(tmp_path / "note.txt", "pixel size 0.5 µm, Zürich\n")
    assert path.read_bytes() == "pixel size 0.5 µm, Zürich\n".encode("utf-8")


def test_transform_series_with_non_ascii_text_loads_in_the_c_locale(tmp_path, c_locale):
    """A series file another tool annotated (an extra key holding UTF-8 text) loads; with
    the locale's default encoding it was refused as "not valid JSON"."""
    import numpy as np

    from napari_registration import Transform
    from napari_registration.core.series import load_transforms, save_transforms

    t = [Transform.from_translation((1.0, 2.0)), Transform.from_translation((0.5, -1.0))]
    path = save_transforms(tmp_path / "series.json", t)
    raw = path.read_bytes().decode("utf-8").replace("{", '{"comment": "0.5 µm pixels", ', 1)
    path.write_bytes(raw.encode("utf-8"))
    got = load_transforms(path)
    assert len(got) == 2
    np.testing.assert_allclose(got[1].matrix, t[1].matrix)
