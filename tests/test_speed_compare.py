"""bench/speed_compare.py's aggregation of repeated rounds (the script itself is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speed_compare.py"


@pytest.fixture(scope="module")
def speed_compare():
    spec = importlib.util.spec_from_file_location("speed_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(ips, first, rss, name):
    return {"name": name, "images_per_s": ips, "first_result_s": first, "peak_rss_mb": rss, "wall_s": 100 / ips,
            "tree_peak_pss_mb": rss, "preds": {}}


def test_rounds_merge_to_medians_and_per_round_ratios(speed_compare):
    rounds = [
        [_run(10, 7.0, 1100, "study"), _run(60, 0.5, 280, "fp32"), _run(100, 0.40, 140, "int8")],
        [_run(20, 6.0, 1150, "study"), _run(110, 0.6, 290, "fp32"), _run(190, 0.45, 143, "int8")],
        [_run(16, 6.5, 1120, "study"), _run(100, 0.7, 285, "fp32"), _run(176, 0.50, 141, "int8")],
    ]
    study, fp32, int8 = speed_compare.merge_rounds(rounds)
    assert study["images_per_s"] == 16 and int8["images_per_s"] == 176 and fp32["images_per_s"] == 100
    assert int8["first_result_s"] == 0.45
    assert int8["peak_rss_mb"] == 143 and study["peak_rss_mb"] == 1150  # memory: the largest seen
    assert int8["ratio_vs_study_runs"] == [10.0, 9.5, 11.0]
    assert int8["ratio_vs_study"] == 10.0  # median of per-round ratios, not 176 / 16 = 11.0
    assert len(int8["rounds"]) == 3

    res = {"variants": [study, fp32, int8], "cpu": "cpu", "cpu_count": 2, "images": 9, "data_name": "d",
           "arch": "a", "input_size": 224, "threads": None, "flatness": None,
           "install_mb": {"runtime": {"packages": ["numpy"], "total_mb": 1.0},
                          "study": {"packages": ["torch"], "total_mb": 2.0}}}
    for v in res["variants"]:
        v.update(agreement_with_study=1.0, accuracy=None)
    text = speed_compare.markdown(res)
    assert "| 10.0x |" in text and "Medians of 3 rounds" in text
    assert "10.0x, 9.5x, 11.0x" in text and "1.67x, 1.73x, 1.76x" in text


def test_one_round_is_passed_through(speed_compare):
    rounds = [[_run(10, 7.0, 1100, "study"), _run(60, 0.5, 280, "fp32"), _run(120, 0.4, 140, "int8")]]
    study, _, int8 = speed_compare.merge_rounds(rounds)
    assert int8["images_per_s"] == 120 and int8["ratio_vs_study"] == 12.0 and study["ratio_vs_study"] == 1.0
