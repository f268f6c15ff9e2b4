"""MLflow tracking, secondary to the files every run writes.

The JSON/CSV files in a run folder are the source of truth. Tracking mirrors
them into MLflow: one experiment per dataset (created as a model-training
experiment), one run per *result*, found again by its identity on a re-run,
a restart or an import. By reader:

- :mod:`~manidp.tracking.store`: where the store is, opening it from parallel
  jobs (file lock, retries while sqlite is locked, bounded HTTP retries), its
  experiments;
- :mod:`~manidp.tracking.identity`: the tags that name a result, and the
  provenance every run carries;
- :mod:`~manidp.tracking.runs`: ``RunTracker`` (one run per result),
  ``MlflowObserver`` (the engine's observer the command line fills in), import
  of a finished run folder;
- :mod:`~manidp.tracking.workflow`: the workflow's parent and summary runs.
"""
from manidp.tracking.identity import IDENTITY_TAG, find_result_runs, flatten, identity_tags, run_name
from manidp.tracking.runs import (CONSTANTS, PENDING_FILE, STATE_FILE, MlflowObserver, RunTracker, abort_open_runs,
                                  import_run, pending)
from manidp.tracking.store import HTTP_RETRY_DEFAULTS, init_store, resolve_uri
from manidp.tracking.store import _client  # noqa: F401  (test_safety calls it)
from manidp.tracking.workflow import log_summary, parent_run

__all__ = ["resolve_uri", "init_store", "RunTracker", "MlflowObserver", "import_run", "pending", "identity_tags",
           "find_result_runs", "abort_open_runs", "flatten", "run_name", "parent_run", "log_summary", "PENDING_FILE",
           "STATE_FILE", "IDENTITY_TAG", "CONSTANTS", "HTTP_RETRY_DEFAULTS"]
