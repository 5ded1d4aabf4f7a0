"""`heartbatch review`: a person checks the measurements the model flagged.

- :mod:`.decisions`: the decisions, durable in the report's ledger (and copied to its CSV and summaries),
- :mod:`.app`: the local web app (Bottle, extra ``[review]``) and its safety rules,
- :mod:`.export`: reviewed films as training labels for ``heartbatch-train``,
- ``static/``: the page (plain HTML, JS and CSS; nothing fetched from elsewhere).
"""
