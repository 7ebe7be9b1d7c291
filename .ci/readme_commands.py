"""README.md's first command, as CI runs it: `python .ci/readme_commands.py install|demo`.

README's first code block is one line, `<install> && sslam-fast demo`: what a new user pastes.
`install` prints the part before the demo, `demo` the demo command with `--quick` appended (the
form CI can afford). tests/test_readme_ci.py checks that .ci/run runs exactly these, so the README
and CI cannot drift apart.
"""
import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DEMO = "sslam-fast demo"


def first_code_block(path: str = README) -> str:
    with open(path, encoding="utf-8") as f:
        match = re.search(r"^```[a-z]*\n(.*?)^```", f.read(), re.S | re.M)
    if match is None:
        raise SystemExit(f"{path}: no code block")
    return match.group(1).strip()


def split_first_command(block: str):
    """(install, demo) of the first code block; an error names what is wrong with it."""
    if "\n" in block:
        raise SystemExit(f"{README}: the first code block must be one command line, got {block!r}")
    install, sep, demo = block.rpartition(" && ")
    if not sep or demo != DEMO:
        raise SystemExit(f"{README}: the first code block must end with ' && {DEMO}', got {block!r}")
    return install, demo


def main(argv) -> int:
    if argv not in (["install"], ["demo"]):
        raise SystemExit(f"usage: {sys.argv[0]} install|demo")
    install, demo = split_first_command(first_code_block())
    print(install if argv == ["install"] else demo + " --quick")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
