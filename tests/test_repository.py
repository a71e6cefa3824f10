"""The repository holds nothing that only works on the machine that made it.

A tracked symbolic link, a file whose content is an absolute path of some machine, or a virtual environment
works where it was made and breaks every fresh clone (`make demo` cannot create `.venv` over a dangling link).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Absolute paths that only exist on one machine: home folders, temporary folders, build and work roots.
MACHINE_ROOTS = ("tmp/", "var/folders/", "home/", "root/", "Users/", "work/", "private/var/")  # each after a "/"
MACHINE_PATH = re.compile(r"(?<![\w.~])/(" + "|".join(re.escape(r) for r in MACHINE_ROOTS) + r")\w|[A-Za-z]:\\Users\\")
VENV_MARKERS = ("pyvenv.cfg", "site-packages/", "bin/activate", "conda-meta/")
# A bundled model's sidecar records the training run's own flags, --data-dir included: provenance, never read back
# for a bundled model (it uses the bundled evaluation and calibration sets).
PROVENANCE = re.compile(r'^models/[^/]+/model\.json$'), re.compile(r'^\s*"data_dir": ')


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def _tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file, as the index has them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed copy): nothing is tracked here")
    rows = []
    for line in _git("ls-files", "-s", "-z").split("\0"):
        if line:
            meta, path = line.split("\t", 1)
            rows.append((meta.split()[0], path))
    return rows


def machine_specific(tracked: list[tuple[str, str]], read) -> list[str]:
    """Why each offending tracked path would break a fresh clone; `read(path)` gives a file's bytes."""
    problems = []
    for mode, path in tracked:
        if mode == "120000":
            problems.append(f"{path}: a symbolic link (to {read(path).decode(errors='replace')!r})")
            continue
        if mode == "160000":
            continue  # a submodule: its own repository
        if any(m in path for m in VENV_MARKERS) or path.split("/")[0] in (".venv", "venv", "env", ".env"):
            problems.append(f"{path}: part of a virtual environment")
            continue
        data = read(path)
        if b"\0" in data[:8000]:
            continue  # binary (weights, images): no paths to read
        text = data.decode("utf-8", errors="replace")
        stripped = text.strip()
        if stripped.startswith("/") and "\n" not in stripped and " " not in stripped:
            problems.append(f"{path}: its whole content is the absolute path {stripped!r}")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if PROVENANCE[0].match(path) and PROVENANCE[1].match(line):
                continue
            if MACHINE_PATH.search(line):
                problems.append(f"{path}:{n}: an absolute path of one machine ({line.strip()[:80]!r})")
                break
    return problems


def test_no_links_machine_paths_or_virtual_environments_are_tracked():
    tracked = _tracked()
    assert len(tracked) > 20  # the listing worked
    problems = machine_specific(tracked, lambda p: _git_blob(p))
    assert not problems, "tracked files that only work on the machine that made them:\n" + "\n".join(problems)


def _git_blob(path: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), "show", f":{path}"], check=True, capture_output=True).stdout


def test_the_check_catches_each_kind():
    """The check itself, on a made-up index: each kind of offender is named, clean files pass."""
    t, h, w = "/" + "tmp", "/" + "home", "/" + "work"  # spelled in pieces, so that this file passes its own check
    files = {
        "README.md": b"Run `make demo`. Paths in prose like ../shared/data are relative.\n",
        "models/model.pt": b"PK\x03\x04\0\0binary " + t.encode() + b"/ inside a zip is not text",
        ".venv": (t + "/probe-venv").encode(),
        "notes/where.txt": b"/opt/build/sdcompress\n",
        "tools/run.sh": f"#!/bin/sh\npython {h}/alice/sdcompress/tools/x.py\n".encode(),
        "venv/pyvenv.cfg": b"home = /usr/bin\n",
        "cfg.json": f'{{"data_dir": "{w}/main/../shared/data"}}\n'.encode(),
        "models/m/model.json": f'{{\n  "data_dir": "{t}/data/cifar10"\n}}\n'.encode(),
        "models/m/MODEL_CARD.md": f"trained from {t}/data/cifar10\n".encode(),
    }
    tracked = [("120000" if p == ".venv" else "100644", p) for p in files]
    problems = machine_specific(tracked, files.__getitem__)
    named = {p.split(":")[0] for p in problems}
    assert named == {".venv", "notes/where.txt", "tools/run.sh", "venv/pyvenv.cfg", "cfg.json", "models/m/MODEL_CARD.md"}, problems


def test_venv_is_ignored_as_a_folder_or_a_link():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in (".venv", ".venv/bin/python"):
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", name])
        assert r.returncode == 0, f"{name} is not ignored by .gitignore"


def test_cli_reference_is_what_the_parsers_say(monkeypatch):
    """docs/cli.md is generated from the parsers; a flag added, renamed or re-described without regenerating it fails
    here (python tools/cli_docs.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "tools" / "cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python tools/cli_docs.py"
    for command in ("train", "prune", "binarize", "export", "report", "sweep", "compare"):
        assert f"## sdcompress {command}" in text
    assert "| `--keep` `KEEP` |" in text and "--arch python:" in text
    monkeypatch.setenv("COLUMNS", "40")  # the terminal's width does not change the file
    assert mod.render() == text


def test_the_api_is_listed_and_documented_with_examples():
    """`dir(sdcompress)` lists the API (imported lazily), and each function's help shows its arguments, what it
    returns and an example."""
    import inspect

    import sdcompress

    assert set(sdcompress.API) <= set(dir(sdcompress))
    for name in sdcompress.API:
        doc = inspect.getdoc(getattr(sdcompress, name)) or ""
        if inspect.isfunction(getattr(sdcompress, name)):
            assert "Args:" in doc and "Returns:" in doc and "Example" in doc and ">>> " in doc, name
        else:
            assert len(doc) > 40, name


def test_readme_is_short_and_its_figures_are_in_the_results():
    """The README stays a one-screen start and a reference (at most 320 lines); every percentage it states is
    also in docs/results.md, where each figure has its command."""
    import re

    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "docs" / "results.md").read_text()
    assert len(readme.splitlines()) <= 320
    figures = set(re.findall(r"\b\d{1,3}\.\d{1,2}%", readme))
    assert figures, "the README states its headline figures"
    assert not sorted(f for f in figures if f not in results)
