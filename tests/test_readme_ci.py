"""README.md's first command is what CI runs: .ci/run takes it from the README (through
.ci/readme_commands.py), runs it in a fresh virtual environment, and runs the base install too."""
import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, ".ci"))
import readme_commands  # noqa: E402


def _ci_script() -> str:
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        return f.read()


def _extras() -> set:
    """The extras setup.py declares, read from its source."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return {key.value for key in extras.keys}


def test_readme_first_block_is_install_then_demo():
    block = readme_commands.first_code_block()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.index(block) < text.index("bash .ci/run")  # the first block, before the test command
    install, demo = readme_commands.split_first_command(block)
    assert block == f"{install} && {demo}" and demo == "sslam-fast demo"
    assert install.startswith("pip install torch==2.13.0 && ")  # the CPU wheel before the project
    for extras in re.findall(r"\.\[([a-z,]+)\]", install):  # every extra it names exists (pip only warns)
        assert set(extras.split(",")) <= _extras(), extras
    for part in ("install", "demo"):
        done = subprocess.run([sys.executable, os.path.join(REPO, ".ci", "readme_commands.py"), part],
                              capture_output=True, text=True, check=True)
        assert done.stdout.strip() == (install if part == "install" else demo + " --quick")


def test_ci_runs_the_readme_command_the_base_install_and_the_tests():
    script = _ci_script()
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert 'INSTALL=$(python .ci/readme_commands.py install)' in lines
    assert 'DEMO=$(python .ci/readme_commands.py demo)' in lines
    order = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in (
        'python -m venv "$ENVS/readme"', '{ eval "$INSTALL"; }', 'eval "$DEMO"',
        'python -m venv "$ENVS/base"', '{ pip install -q torch==2.13.0 && pip install -q "$REPO"; }',
        'sslam-fast demo --quick', 'python -m pip install -q -e ".[dev,triton,dali]"', 'python -m pytest -q')]
    assert order == sorted(order), order
    assert lines[-1] == "python -m pytest -q"  # the README's test command ends CI
    assert set(re.search(r'-e "\.\[([a-z,]+)\]"', script).group(1).split(",")) | {"onnx", "tensorboard", "demo"} \
        == _extras()  # the test environment has every extra (dev holds onnx and tensorboard)


def test_first_command_parser_refuses_a_block_it_cannot_run(tmp_path):
    import pytest

    for block in ("pip install -e .\nsslam-fast demo", "pip install -e . && sslam-fast train"):
        with pytest.raises(SystemExit, match="first code block"):
            readme_commands.split_first_command(block)
