"""Growth event records and sinks (JSONL, TensorBoard)."""

from .jsonl import BadLine, JsonlSink, read_events
from .record import EVENT_KINDS, SCHEMA_VERSION, STRUCTURE_KINDS, GrowthEvent

__all__ = ["BadLine", "EVENT_KINDS", "GrowthEvent", "JsonlSink", "SCHEMA_VERSION",
           "STRUCTURE_KINDS",
           "read_events"]
