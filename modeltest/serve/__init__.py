"""`modeltest serve`: an OpenAI-compatible Qwen2-VL server on the inference core.

config.py        ServeConfig: every setting; the command line is generated from it
protocol.py      what both endpoints share: errors, the field policy (used / refused / unknown),
                 the sampling fields and their checks, usage, model cards (no engine import)
chat_protocol.py a /v1/chat/completions body -> ChatRequest (messages, media, logprobs)
text_protocol.py a /v1/completions body -> CompletionRequest (prompts as text or ids, echo)
shapes.py        what answers look like: the chat and the legacy text shape, bodies and chunks
structured.py    response_format / guided_* -> one llguidance grammar, checked
tools.py         tool calling: the request's tools, the tool template, parsing and forcing calls
media_urls.py    data: / file:// / path / http(s) URLs -> local files, with the allow-list
preprocess.py    a request -> its conversation -> model input (inputs.py: the harness's path)
detokenize.py    token ids -> the text a client reads, incrementally, on the engine's stop rule
responses.py     an admitted request: each choice one engine request; their events -> one JSON
                 body or one SSE stream (choices interleaved); aborts; metrics, access log
engine_loop.py   the engine in one thread (and the other tensor-parallel ranks), the asyncio bridge
metrics.py       Prometheus counters, histograms and gauges
gatekeeper.py    ASGI middleware: the API key and the body size limit
app.py           the FastAPI app: thin routes
server.py        uvicorn, the draining server, tensor-parallel followers
"""
