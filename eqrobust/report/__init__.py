"""Typed results -> report.md, results.json, PNG figures and a perturbation gallery per model.

Depends on `eqrobust.results` only. A new section is a renderer in `sections.py` (added to
`SECTIONS`); a new figure is an entry in `plots.FIGURES`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from eqrobust.report import plots
from eqrobust.report.sections import SECTIONS, Files, summary_rows
from eqrobust.report.text import md_table, mean_ci
from eqrobust.results import StudyResults

__all__ = ["markdown", "md_table", "mean_ci", "summary_rows", "write_report"]


def markdown(results: StudyResults, files: Files) -> str:
    """The report text; `files` maps figure keys and gallery run ids to relative file names."""
    return "\n".join(line for section in SECTIONS for line in section(results, files))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def write_report(results: StudyResults, workdir: str) -> dict[str, str]:
    """Writes report.md, results.json, the figures and one gallery PNG per model run.

    Returns:
      Mapping from artefact key to its path.
    """
    os.makedirs(workdir, exist_ok=True)
    files: Files = {}
    for key, (figure, fname, has_data) in plots.FIGURES.items():
        if has_data(results):
            figure(results, os.path.join(workdir, fname))
            files[key] = fname
    models = []
    for m in results.models:
        if m.gallery is not None and m.gallery.clean is not None:
            fname = f"gallery_{_slug(m.name)}_seed{m.seed}.png"
            plots.gallery(m, os.path.join(workdir, fname), results.meta.get("class_names"))
            files[m.run_id] = fname
            m = dataclasses.replace(m, gallery=dataclasses.replace(m.gallery, file=fname))
        models.append(m)
    results = dataclasses.replace(results, models=tuple(models))
    js = results.to_json()
    StudyResults.from_json(js)  # what we write must read back
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(js, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(results, files))
    paths = {k: os.path.join(workdir, v) for k, v in files.items()}
    paths["report"] = os.path.join(workdir, "report.md")
    paths["json"] = os.path.join(workdir, "results.json")
    return paths
