"""The first hour, as text a newcomer reads: one test command, no install by bare name, one Python floor.

Cheap checks over the files themselves (the install and the doc-test run the real thing elsewhere:
tests/test_install.py, tests/test_docs.py).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
# `pip install 'edgefleet[agent]'`, `pip install edgefleet`, `pip install "edgefleet==0.1"`: a name an index resolves.
BARE_NAME = re.compile(r"pip3? install\b[^\n`]*?(?<![\w./-])['\"]?edgefleet(?:\[|==|>=|['\"\s`]|$)")


def test_no_doc_installs_edgefleet_by_name_from_an_index() -> None:
    hits = [
        f"{doc.relative_to(REPO)}:{n}: {line.strip()}"
        for doc in [*DOCS, REPO / "deploy" / "install-agent.sh"]
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if BARE_NAME.search(line)
    ]
    assert not hits, "edgefleet is on no package index; install the wheel (make wheel) or a checkout:\n" + "\n".join(hits)


def test_bare_name_pattern_tells_a_name_from_a_file_or_checkout() -> None:
    for bad in ("pip install 'edgefleet[agent]'", "pip install edgefleet", 'pip install "edgefleet==0.1.0"'):
        assert BARE_NAME.search(bad), bad
    for ok in (
        "pip install 'dist/edgefleet-0.1.0-py3-none-any.whl[agent]'",
        "pip install -e '.[server]'",
        "pip install './edgefleet-0.1.0-py3-none-any.whl[agent]'",
        "pip install /src/edgefleet",
    ):
        assert not BARE_NAME.search(ok), ok


def test_ci_script_installs_no_python_packages_and_runs_make_test() -> None:
    """.ci/run adds system packages and services; `make test`, the README's command, does the rest."""
    script = (REPO / ".ci" / "run").read_text()
    code = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\bpip3?\b|-m pip|\buv\b", line)], code
    assert code[-1].strip() in {"make test", "exec make test"}, code[-1]


def test_make_test_under_ci_installs_the_pinned_converter_frameworks() -> None:
    """`make -n` shows what CI=true make test would run, without running it."""
    r = subprocess.run(
        ["make", "-n", "--no-print-directory", "-B", "pytest", "CI=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    install = next(line for line in r.stdout.splitlines() if "convert-torch" in line)
    assert "'torch==2.13.0'" in install and "'tensorflow-cpu>=2.16'" in install, install
    plain = subprocess.run(
        ["make", "-n", "--no-print-directory", "-B", "pytest", "CI="], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 0, plain.stderr
    assert "torch" not in plain.stdout, "without CI=true, make test must not pull in PyTorch"


def test_python_floor_is_3_11_in_pyproject_makefile_script_and_readme() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    assert "sys.version_info < (3, 11)" in (REPO / "Makefile").read_text()
    assert "sys.version_info < (3, 11)" in (REPO / "deploy" / "install-agent.sh").read_text()
    assert "Python 3.11+" in (REPO / "README.md").read_text()
    pi = (REPO / "docs" / "install-pi.md").read_text()
    assert "Python 3.11 or later" in pi and "JetPack 6" in pi
