"""The engine: requests batched step by step under the released sampler (continuous batching, events,
statistics), its step runners, and the slow reference generator. It speaks token ids only."""

from .engine import Engine
from .params import SETTINGS, RequestError, ResolvedParams, SamplingParams
from .reference import reference_generate
from .request import CommitAction, CommitEvent, CommitHook, Completion, DraftEvent, Event, RequestStats
from .runners import RUNNERS

__all__ = [
    "RUNNERS", "SETTINGS", "CommitAction", "CommitEvent", "CommitHook", "Completion", "DraftEvent", "Engine", "Event",
    "RequestError", "RequestStats", "ResolvedParams", "SamplingParams", "reference_generate",
]
