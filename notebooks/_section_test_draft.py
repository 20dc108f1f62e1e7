"""Draft for test_srvit.py: every section of notebooks/classroom.ipynb runs on its own after the setup.

The notebook's code cells are executed in-process (exec in a dict namespace, no Jupyter), in its quick
budget (SRVIT_NOTEBOOK=quick), from the notebooks/ folder as Jupyter would start the kernel. Sections are
found by the numbered markdown headings ("## 1.", "## 2.", "### 4.1", ...): a code cell belongs to the
last numbered heading above it, and the code cells before "## 1." are the setup (imports, budget, data,
helpers). The setup runs once; each section then runs alone on a copy of the setup's namespace, with its
own empty runs folder, so a section that needs another section's variables or files fails here.

    pytest notebooks/_section_test_draft.py -q          # or: python notebooks/_section_test_draft.py

Needs a local CIFAR-10 folder (SRVIT_DATA, or ../shared/data/cifar10 next to the repository): without
one the notebook would download 170 MB, so the tests skip.
"""

import json
import os
import re
import sys
import time

import pytest

_here = os.path.dirname(os.path.abspath(__file__))
HERE = _here if os.path.isfile(os.path.join(_here, "srvit.py")) else os.path.dirname(_here)   # the repository
NOTEBOOKS = os.path.join(HERE, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOKS, "classroom.ipynb")
SHIPPED = os.path.join(HERE, "assets", "classroom-R4.pt")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.?\s", re.M)      # "## 1. ...", "### 4.1 ..."
TRAINING_SECTIONS = {"3", "4.6"}          # the only sections that train (in quick mode: seconds)


def notebook_sections(path=NOTEBOOK):
    """(setup, sections): setup is [(cell number, source)] of the code cells before the first numbered
    heading; sections maps "1", "2", "3", "4.1", ... to their code cells, in notebook order."""
    with open(path) as f:
        nb = json.load(f)
    setup, sections, current = [], {}, None
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown":
            numbers = HEADING.findall(source)
            if numbers:                       # "## 4. ...\n### 4.1 ..." in one cell: the cells below are 4.1's
                current = numbers[-1]
                sections.setdefault(current, [])
        elif cell["cell_type"] == "code":
            (setup if current is None else sections[current]).append((i, source))
    return setup, {name: cells for name, cells in sections.items() if cells}


SETUP, SECTIONS = notebook_sections()


def local_cifar():
    """The CIFAR-10 folder the notebook's data cell would find, or None (it would download)."""
    candidates = [os.environ.get("SRVIT_DATA"), os.path.join(HERE, "data", "cifar10"),
                  os.path.join(HERE, "..", "shared", "data", "cifar10")]
    return next((c for c in candidates if c and os.path.isdir(os.path.join(c, "train"))), None)


def run_cells(cells, ns, where):
    for i, source in cells:
        exec(compile(source, f"notebook cell {i} ({where})", "exec"), ns)   # a failing cell names itself


@pytest.fixture(scope="module")
def setup_namespace(tmp_path_factory):
    if local_cifar() is None:
        pytest.skip("no local CIFAR-10 folder (set SRVIT_DATA, or put train/ and test/ in ../shared/data/cifar10): "
                    "the notebook would download CIFAR-10, which these tests do not do")
    mp = pytest.MonkeyPatch()
    mp.setenv("SRVIT_NOTEBOOK", "quick")
    mp.setenv("SRVIT_RUNS", str(tmp_path_factory.mktemp("runs-setup")))
    mp.chdir(NOTEBOOKS)                                   # where Jupyter starts the kernel
    mp.setattr(sys, "path", list(sys.path))               # the setup inserts the repository
    ns = {"__name__": "__main__", "display": lambda *a, **k: None}
    try:
        run_cells(SETUP, ns, "setup")
        yield ns
    finally:
        mp.undo()


def run_section(name, setup_ns, runs):
    """Section `name` alone on a copy of the setup namespace, with `runs` (empty) as its runs folder."""
    # The helpers were defined in the setup namespace and read RUNS from there, not from the copy.
    setup_ns["RUNS"] = str(runs)
    ns = dict(setup_ns)
    cwd = os.getcwd()
    os.chdir(NOTEBOOKS)
    try:
        run_cells(SECTIONS[name], ns, f"section {name}")
    finally:
        os.chdir(cwd)
    return ns


def test_notebook_has_sections_and_no_outputs():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") == [] and c.get("execution_count") is None for c in code), \
        "the notebook holds stored outputs: clear them before committing"
    assert len(SETUP) == 4, f"setup = imports, budget, data, helpers; found {len(SETUP)} code cells before '## 1.'"
    assert {"1", "2", "3", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7"} <= set(SECTIONS), sorted(SECTIONS)
    assert os.path.isfile(SHIPPED) and os.path.getsize(SHIPPED) < 1_000_000, \
        f"{SHIPPED}: the shipped checkpoint the sections after training use (under 1 MB)"


@pytest.mark.parametrize("name", list(SECTIONS))
def test_notebook_section_runs_alone(name, setup_namespace, tmp_path):
    runs = tmp_path / "runs"
    t0 = time.time()
    ns = run_section(name, setup_namespace, runs)
    print(f"section {name}: {time.time() - t0:.1f} s")
    trained = sorted(os.listdir(runs)) if runs.is_dir() else []
    if name in TRAINING_SECTIONS:
        assert trained, f"section {name} should train a model into RUNS"
    else:
        assert not trained, f"section {name} trained {trained}: after section 3 the sections use the shipped checkpoint"
    if name == "3":
        import srvit
        assert isinstance(ns["model"], srvit.SRViT) and not ns["model"].training
        assert os.path.isfile(runs / "main" / "best.pt")
        # Running the training cell again (as after an interrupt) must not delete the run: it reuses it.
        mtime = os.path.getmtime(runs / "main" / "last.pt")
        run_section(name, setup_namespace, runs)
        assert os.path.getmtime(runs / "main" / "last.pt") == mtime


if __name__ == "__main__":            # the same runs without pytest, with a time per section
    if local_cifar() is None:
        sys.exit("no local CIFAR-10 folder: skipped")
    import tempfile
    os.environ["SRVIT_NOTEBOOK"] = "quick"
    tmp = tempfile.mkdtemp(prefix="notebook-sections-")
    os.environ["SRVIT_RUNS"] = os.path.join(tmp, "runs-setup")
    os.chdir(NOTEBOOKS)
    t_all = t0 = time.time()
    ns = {"__name__": "__main__", "display": lambda *a, **k: None}
    run_cells(SETUP, ns, "setup")
    print(f"setup: {time.time() - t0:.1f} s")
    for name in SECTIONS:
        t0 = time.time()
        run_section(name, ns, os.path.join(tmp, f"runs-{name}"))
        print(f"section {name}: {time.time() - t0:.1f} s")
    print(f"all: {time.time() - t_all:.1f} s")
