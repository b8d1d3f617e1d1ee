"""`sparseferry serve`: an OpenAI-compatible HTTP server over a streamed model, with continuous batching."""
from .batcher import AdmissionError, Batcher, Event, InvalidRequest, NotRunning, Overloaded, Request, RequestTooLarge
from .sampling import SamplingParams

__all__ = ["AdmissionError", "Batcher", "Event", "InvalidRequest", "NotRunning", "Overloaded", "Request", "RequestTooLarge", "SamplingParams"]
