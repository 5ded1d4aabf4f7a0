"""DICOM networking: :mod:`.listen`, a Storage SCP that receives films by C-STORE into the `watch`
pipeline, and :mod:`.send`, which delivers the DICOM results by C-STORE from the ledger's outbox.

Nothing is imported here: ``--send-to`` parses its destination (:mod:`.send`) before checking that
pynetdicom is installed, and :mod:`.listen` brings in the whole pipeline.
"""
