"""The offloading runtime: plan tiers under a budget, stream compressed layers, compute with transformers."""
from .budget import BudgetError, format_bytes, parse_budget
from .engine import RuntimeLoadError, StreamingEngine, load, load_tokenizer
from .generate import generate_text
from .plan import Plan, make_plan

__all__ = ["BudgetError", "Plan", "RuntimeLoadError", "StreamingEngine", "format_bytes", "generate_text", "load", "load_tokenizer",
           "make_plan", "parse_budget"]
