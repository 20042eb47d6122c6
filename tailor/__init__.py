"""llm-tailor: depth-prune a causal LM, heal it by distillation, and prove the result.

This package is the Prefect-free library; `tasks/` and `flows/` orchestrate it.
"""

__version__ = "0.1.0"
