"""Serving: the inference engine (continuous batching, exact prefix reuse in memory and on disk) and the OpenAI HTTP
server (``dsv4 serve``)."""
