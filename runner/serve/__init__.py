"""Serving a built recipe: an OpenAI-compatible HTTP API over its models, and the terminal chat.

One concept a module, read in this order:

- `openai` — the request models, the response shapes and the error shape (pure pydantic, no FastAPI)
- `engine` — `Sampling`, `Output`, the `Engine` protocol every serving engine implements, and the one place
  where a request parameter an engine does not support is refused
- `codec` — a model's text side: prompt template, tokenizer, context check, end-of-answer rules
- `text` — turning token ids into streamed text: incremental decoding and stop strings
- `thread` — the process's one model thread
- `batcher` — continuous batching for transformers models
- `hf`, `llamacpp`, `vllm` — the engines (`serve.engine`)
- `load` — a built recipe's models, for its engine
- `app`, `guard` — the HTTP app and the ASGI guard in front of it (token, body limits, access log)
"""
