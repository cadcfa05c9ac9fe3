"""Helpers shared by the test suites, imported by name (``from tests.support.cli import run_cli``).

conftest.py files hold fixtures and hooks only; anything a test imports lives here:

- ``paths``: the checkout, the shared PneumoniaMNIST file, the ``medray`` console script;
- ``cli``: run the real CLI in a subprocess (``run_cli``, ``cli_json``);
- ``data``: small inputs built on the fly (MedMNIST cuts, PNG/JPEG headers that lie, bombs, DICOM);
- ``waiting``: bounded polling (``wait_for``): every wait in the suites ends by time;
- ``configs``: readers of configs/, docker/ and pyproject.toml for the config tests;
- ``scan``: finds secret strings inside bytes, Parquet columns and zip archives;
- ``faults``: the shared pipeline, lake readers and cluster process finders of the fault and
  security suites.
"""
