"""The accuracy-and-speed report's machinery on one small case, so it does not rot:
case building, methods (ours + the peers that are installed and cheap to import),
TRE against the truth, measurement, summary table and doc-section writing."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

report = pytest.importorskip("report")
report_cases = pytest.importorskip("report_cases")
report_methods = pytest.importorskip("report_methods")


@pytest.fixture(scope="module")
def small_case():
    cases, skipped = report_cases.build([lambda: report_cases.camera_translation(size=128)])
    assert not skipped
    return cases[0]


def _methods():
    ms = [report_methods.Ours("fourier"), report_methods.PhaseCorrelation()]
    if importlib.util.find_spec("cv2") is not None:
        ms.append(report_methods.OpenCVSift())
    if importlib.util.find_spec("SimpleITK") is not None:
        ms.append(report_methods.SimpleITKDirect())
    return ms


def test_case_truth_maps_moving_to_fixed(small_case):
    c = small_case
    assert c.fixed.shape == c.moving.shape == (128, 128)
    assert c.points.shape == (49, 2)
    # the truth is a shift of (7.3, -11.6) * 128 / 512 px: moving points are fixed points minus it
    moved = c.truth.apply_inverse(c.points)
    np.testing.assert_allclose(c.points - moved, np.tile([1.825, -2.9], (49, 1)), atol=1e-9)


def test_quick_machinery_on_one_case(small_case, tmp_path):
    methods = _methods()
    runs = []
    for m in methods:
        assert m.applies(small_case)
        m.setup()
        rec = report.run_one(m, small_case, threshold=0.5)
        rec["repeat"] = 0
        runs.append(rec)
    by_name = {r["method"]: r for r in runs}
    ours = by_name["ours: fourier"]
    assert ours["ok"], ours
    assert ours["tre_mean"] < 0.05 and ours["tre_max"] >= ours["tre_mean"]
    assert ours["seconds"] > 0
    assert by_name["skimage phase_cross_correlation"]["tre_mean"] < 0.2

    table = report.summarise(runs)
    md = report.markdown_table(table, [small_case], methods)
    assert md.count("\n") == 1 + len(methods)
    assert "**ours: fourier**" in md
    verdict = report.verdicts(table, [small_case], methods)[0]
    assert verdict["ours"] == "ours: fourier"
    assert verdict["verdict"] in ("ahead", "even", "mixed", "behind")
    assert verdict["accuracy"] in ("ahead", "tie", "behind")


def test_failures_are_recorded_not_raised(small_case):
    class Broken(report_methods.Method):
        name = "broken"

        def applies(self, case):
            return True

        def run(self, case):
            raise RuntimeError("no alignment\nreal reason")

    rec = report.run_one(Broken(), small_case, threshold=2.0)
    assert rec["ok"] is False and rec["error"] == "RuntimeError: real reason"

    class Wrong(report_methods.Ours):
        def mapper(self, case, raw):
            return lambda p: np.asarray(p) + 10.0   # off by (10, 10) + the true shift

    rec = report.run_one(Wrong("fourier"), small_case, threshold=2.0)
    assert rec["ok"] is False and rec["tre_mean"] == pytest.approx(np.hypot(11.825, 7.1), rel=1e-6)


def test_measure_sees_native_allocations():
    _, seconds, mb = report.measure(lambda: np.ones((64, 1024, 1024), np.uint8).sum())
    assert seconds > 0
    if mb is not None:   # Linux with /proc/self/clear_refs
        assert mb > 50


def test_replace_section_keeps_other_sections():
    text = "# B\n<!-- BEGIN summary -->\nold\n<!-- END summary -->\n<!-- BEGIN fourier -->\nF\n<!-- END fourier -->\n"
    out = report.replace_section(text, "summary", "new")
    assert "old" not in out and "new" in out and "F" in out
    out = report.replace_section(out, "report", "R", title="Accuracy and speed report")
    assert out.rstrip().endswith("<!-- END report -->")
    assert "## Accuracy and speed report" in out
    again = report.replace_section(out, "report", "R2", title="Accuracy and speed report")
    assert again.count("## Accuracy and speed report") == 1 and "R2" in again


def test_cases_option_takes_builder_and_case_names_in_report_order():
    got = report.select_builders("moon_similarity, brain_t1_vs_gm_2d,camera_translation")
    assert [b.__name__ for b in got] == ["camera_translation", "moon_similarity",
                                         "brain_multimodal_2d"]
    assert report.select_builders("brain_multimodal_2d") == [report_cases.brain_multimodal_2d]


def test_cases_option_refuses_an_unknown_name_and_lists_the_valid_ones():
    with pytest.raises(SystemExit) as err:
        report.select_builders("moon_similarity,moon_similarty")
    msg = str(err.value)
    assert "moon_similarty" in msg and "camera_translation" in msg and "brain_t1_vs_gm_2d" in msg
    with pytest.raises(SystemExit):
        report.select_builders(" , ")
