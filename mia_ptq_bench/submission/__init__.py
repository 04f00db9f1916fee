"""Submissions: one folder per submitted quantizer, holding its metadata, code and results.

A submission folder holds::

    submission.yaml              metadata (schema.py)
    README.md, LICENSE*          optional
    *.py                         the quantizer's code, when it lives in the folder
    results/MANIFEST.json        sha256 of every result document
    results/<task>/<plan>--<threat>.json   result documents written by `evaluate --submission`
    results/<task>/<plan>--<threat>.npz    their arrays (optional, not committed)

This package reads and checks folders and never imports the quantizer stack (or torch):
``resolve.py``, which turns a submission into a quantizer class, is imported only where a
quantizer is about to run.
"""

from .load import find_submissions, load_submission
from .manifest import MANIFEST, manifest_path, write_manifest
from .schema import REFERENCE_ENTRIES, SubmissionSpec
from .validate import submission_problems, validate_submission

__all__ = ["MANIFEST", "REFERENCE_ENTRIES", "SubmissionSpec", "find_submissions", "load_submission", "manifest_path",
           "submission_problems", "validate_submission", "write_manifest"]
