"""The lake and its four stores: datasets (catalog), models (registry), runs, job history.

``layout`` knows every lake path; the other modules ask it and never spell one. ``atomic`` holds
the conditional writes (create-if-absent, replace/delete-if-unchanged) that version claims and
``leases`` (one job per run id) are built on. Shared by every job package, so nothing here
imports one.
"""
