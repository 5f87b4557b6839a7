"""Growth event records and sinks (JSONL, TensorBoard)."""

from .jsonl import BadLine, JsonlSink, read_events
from .record import EVENT_KINDS, SCHEMA_VERSION, GrowthEvent

__all__ = ["BadLine", "EVENT_KINDS", "GrowthEvent", "JsonlSink", "SCHEMA_VERSION", "read_events"]
