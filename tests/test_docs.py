"""The user-facing pages stay what they promise: a short README with its sections, results that
open with the current bests, and no link or script path that points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_short_product_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    headings = re.findall(r"^## (.+)$", text, re.M)
    for wanted in ("Set up and run", "Python quick start", "Command-line quick start", "Methods", "Commands",
                   "Current best results", "Learn more"):
        assert wanted in headings


def test_results_open_with_the_current_best_tables():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    areas = re.findall(r"^## (.+)$", text, re.M)
    assert areas[:5] == ["Training-free quality", "Learned ranks and healing", "Speed and ceilings",
                         "Compression cost", "Design-space sweeps"]
    assert "Session" not in "".join(re.findall(r"^#+ .+$", text, re.M))  # the logs live in docs/lab-notes


def test_every_link_and_script_path_exists():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http") and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
        for script in re.findall(r"\b(benchmarks/[\w/]+\.(?:py|sh))\b", text):
            if not (ROOT / script).exists():
                broken.append(f"{page.relative_to(ROOT)}: {script}")
    assert broken == []
