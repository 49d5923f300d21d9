"""Rewrite every dvc.yaml stage's `align2llava/` deps to the module files its script imports.

    python -m tests.update_deps

tests/test_pipeline.py fails when a stage's deps and its imports disagree; this puts them right
(other deps, comments and the order of everything else are kept).
"""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT
from tests.test_pipeline import imported_modules, module_of


def update(text: str) -> str:
    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([a-z_-]+):\s*$", line)
        if m and m.group(1) in stages:
            stage = m.group(1)
        if stage and re.match(r"^    deps:\s*$", line):
            out.append(line)
            i += 1
            block = []
            while i < len(lines) and lines[i].startswith("      "):
                block.append(lines[i])
                i += 1
            script = ROOT / (module_of(stage).replace(".", "/") + ".py")
            mods = [f"      - {m}\n" for m in sorted(imported_modules(script))]
            kept = [b for b in block if not b.strip().startswith("- align2llava/")]
            at = next(j for j, b in enumerate(kept) if b.strip().startswith("- stages/")) + 1
            out += kept[:at] + mods + kept[at:]
            continue
        out.append(line)
        i += 1
    return "".join(out)


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    old = path.read_text()
    new = update(old)
    path.write_text(new)
    print("dvc.yaml deps updated" if new != old else "dvc.yaml deps already match the imports")
