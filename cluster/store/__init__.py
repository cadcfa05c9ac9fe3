"""The lake and its four stores: datasets (catalog), models (registry), runs, job history.

``layout`` knows every lake path; the other modules ask it and never spell one. Shared by every
job package, so nothing here imports one.
"""
