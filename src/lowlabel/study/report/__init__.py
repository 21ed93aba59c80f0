"""A study's report from what its runs wrote: ``report.md``, a self-contained ``report.html``,
``runs.csv`` and ``figures/``.

Nothing here trains or runs a network: the report reads ``plan.json`` and each run folder
(``result.json``, ``metrics.jsonl``, and the ``overlay.npz`` that evaluation wrote), so
``lowlabel report STUDY_DIR`` rebuilds it at any time, also from a study that is only partly
done. :mod:`.runs` loads the runs, :mod:`.tables` builds the tables, :mod:`.figures` draws the
figures and :mod:`.render` writes the pages.
"""

from lowlabel.study.report.render import build_report

__all__ = ["build_report"]
