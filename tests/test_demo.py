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


def test_demo_says_what_to_install_before_any_work(tmp_path):
    """Without matplotlib (or deepspeed) the demo stops at once with one line, writing nothing."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from sslam_fast.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'demo')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("sslam-fast demo: error: the demo needs matplotlib, which is not installed: "
                                   "pip install matplotlib (both are dependencies of `pip install sslam-fast`)")
    assert not (tmp_path / "demo").exists()


def test_results_are_written_before_the_plot(tmp_path, monkeypatch):
    """A failure while drawing loses nothing: results.json is complete when the plot starts."""
    from sslam_fast.evaluation import demo

    tiny = demo.DemoSize(1.0, 96, 2, 1, 8, 4, 4, (16, 16, 64))
    monkeypatch.setattr(demo, "QUICK", tiny)
    seen = {}

    def plot(results, path):
        with open(tmp_path / "results.json") as f:
            seen.update(json.load(f))
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(demo, "_plot", plot)
    with pytest.raises(RuntimeError, match="drawing failed"):
        demo.run_demo(str(tmp_path), quick=True)
    assert set(seen["scores"]) == {"random init", "stage 1 (EAT)", "stage 1 + 2 (SSLAM)"}
    assert seen["pretraining"]["stage1"]["updates"] == 4
