"""`modeltest serve`: an OpenAI-compatible Qwen2-VL server on the inference core.

config.py        ServeConfig: every setting; the command line is generated from it
protocol.py      the wire format: parsing chat requests (and their sampling parameters),
                 response and error bodies (no engine import)
media_urls.py    data: / file:// / path / http(s) URLs -> local files, with the allow-list
preprocess.py    a request -> its conversation -> model input (inputs.py: the harness's path)
detokenize.py    token ids -> the text a client reads, incrementally, on the engine's stop rule
responses.py     one admitted request: its events -> a JSON body or an SSE stream; aborts
engine_loop.py   the engine in one thread (and the other tensor-parallel ranks), the asyncio bridge
metrics.py       Prometheus counters, histograms and gauges
gatekeeper.py    ASGI middleware: the API key and the body size limit
app.py           the FastAPI app: thin routes
server.py        uvicorn, the draining server, tensor-parallel followers
"""
