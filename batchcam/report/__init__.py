"""REPORT: its claim and lock, the row store and journal, the folder writer, the manifest and
metrics, the gallery."""
