"""The DICOM DIMSE door: what a PACS that speaks C-STORE (not HTTP) sends to, and C-ECHO."""
