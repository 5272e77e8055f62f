"""Data: the reference-data generator and batch I/O."""
