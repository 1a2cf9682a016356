"""`modeltest serve`: an OpenAI-compatible Qwen2-VL server on the inference core.

    config.py        ServeConfig: every setting, from the command line
    protocol.py      the wire format: parsing chat requests, response and error bodies (no engine)
    media_urls.py    data: / file:// / path / http(s) URLs -> local files, with the allow-list
    preprocess.py    OpenAI messages -> qwen-vl-utils -> the transformers processor (the harness's path)
    engine_loop.py   the engine in one thread (and the other tensor-parallel ranks), the asyncio bridge
    metrics.py       Prometheus counters, histograms and gauges
    app.py           the ASGI app (FastAPI): routes, auth, body limit, lifecycle; uvicorn runs it
"""
