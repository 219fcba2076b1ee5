"""Generation: the engine (continuous batching, events) and the slow reference generator."""

from .engine import Completion, Engine
from .reference import reference_generate
from .request import (
    CommitAction,
    CommitEvent,
    DraftEvent,
    Event,
    RequestError,
    RequestStats,
    ResolvedParams,
    SamplingParams,
)

__all__ = [
    "CommitAction", "CommitEvent", "Completion", "DraftEvent", "Engine", "Event", "RequestError", "RequestStats",
    "ResolvedParams", "SamplingParams", "reference_generate",
]
