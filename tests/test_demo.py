"""`sslam-fast demo --quick` end to end, as CI runs it: results.json and the PNG."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_quick_writes_results_and_png(tmp_path):
    out = tmp_path / "demo"
    # `python -m sslam_fast.cli` is the `sslam-fast` entry point, run from this checkout
    done = subprocess.run([sys.executable, "-m", "sslam_fast.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 1 + 2 (SSLAM)" in done.stdout and "mono acc %" in done.stdout
    results = json.load(open(out / "results.json"))
    assert results["quick"] is True
    assert set(results["scores"]) == {"random init", "stage 1 (EAT)", "stage 1 + 2 (SSLAM)"}
    for score in results["scores"].values():
        assert 0.0 <= score["mono_accuracy"] <= 100.0 and 0.0 <= score["poly_mAP"] <= 100.0
    runs = results["pretraining"]
    assert runs["stage1"]["updates"] == runs["sslam_stage1"]["updates"] + runs["sslam_stage2"]["updates"]
    assert runs["stage1"]["stage"] == 1 and runs["sslam_stage1"]["stage"] == 1 and runs["sslam_stage2"]["stage"] == 2
    assert len(runs["stage1"]["curve"]["loss"]) > 1 and len(runs["sslam_stage2"]["curve"]["loss"]) > 1
    bench = results["benchmark"]
    assert set(bench["clips"]) == {"mono_train", "mono_test", "poly_train", "poly_test"} and len(bench["classes"]) >= 2
    assert isinstance(bench["synthesised"], bool) and results["seconds"]["total"] > 0
    assert results["machine"]["cpus"] >= 1 and results["date"]
    png = out / "demo.png"
    assert png.is_file() and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
