"""A report and everything kept beside it, one module per concern:

- :mod:`.schema`: the columns (a leaf: everyone may read it),
- :mod:`.table`: the CSV, with safe cells, written batch by batch,
- :mod:`.ledger`: the durable state (SQLite) the CSV is a copy of, and the ``--send-to`` outbox,
- :mod:`.paths`: the files that belong to a report,
- :mod:`.session`: a report opened for writing, shared by `run`, `watch`, `listen` and Dask,
- :mod:`.summary`: the CTR summaries (JSON, Markdown) read back from the CSV,
- :mod:`.html`: the self-contained HTML report.
"""
