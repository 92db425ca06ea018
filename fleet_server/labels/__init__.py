"""Labels that arrive after the fact: the true classes of a window's predictions.

A device never uploads its inputs or its individual predictions, so labels
come back as what can be matched to a window without them: per window, the
confusion counts ``counts[actual][predicted]`` of its predictions whose true
class became known (a technician's inspection, a later sensor reading). The
server then shows the accuracy measured on the labelled windows beside the
estimate CBPE makes without labels (:mod:`fleet_server.drift.service`).

Rules:

- A request is all or nothing: every window must be one the server holds and
  carry a top-score histogram (only then does its model have classes), and
  every class named must be one of the window's model's; otherwise nothing is
  stored and the error names the first window that does not fit.
- Labels of a window posted again replace the earlier ones (a correction), and
  the audit log records every post with its totals.
- Labels are not checked against the window's own prediction counts: a
  window's histogram counts only the predictions it summarised, and labels may
  cover any number of them.
"""

from fleet_server.labels.rules import LabelsError, confusion_counts
from fleet_server.labels.service import post_labels

__all__ = ["LabelsError", "confusion_counts", "post_labels"]
