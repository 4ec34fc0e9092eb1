"""runner: declarative recipes for fine-tuned, served LLMs, built as cached, content-hashed steps.

The public API lives in `runner.api`; the command line in `runner.cli`.
"""

__version__ = "0.1.0"
