"""Errors a DAG task should fail on without retrying: retrying cannot change the outcome."""


class PipelineRejection(RuntimeError):
    """A deterministic rejection (bad data, broken checkpoint, diverged training)."""


class DataRejected(PipelineRejection):
    """The batch broke the data contract; it was quarantined."""


class CheckpointRejected(PipelineRejection):
    """The checkpoint failed its integrity check."""
