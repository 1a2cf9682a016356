"""Start the server: load the engine (in its thread, so /health answers 503 meanwhile), run
uvicorn on rank 0, follow rank 0's steps on every other tensor-parallel rank, and drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

import uvicorn

from ..backends.base import BackendSettings
from ..backends.engine import engine_config
from ..config.loader import resolve_data_type
from ..config.schema import ENGINE_SETTINGS, ModelConfig
from ..device import resolve_device
from ..engine.engine import LLMEngine
from ..engine.loader import check_weight_files
from ..engine.parallel import init_parallel
from ..errors import UserError
from .app import ServerState, create_app
from .config import ServeConfig
from .engine_loop import Channel, EngineLoop, follow
from .gatekeeper import Gatekeeper
from .metrics import ServerMetrics
from .preprocess import Preprocessor


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another --port"
            ) from None


class DrainingServer(uvicorn.Server):
    """uvicorn, with /health turning 503 the moment SIGTERM/SIGINT arrives: requests in flight get
    `drain_timeout_s` to finish, then are aborted in the engine (their clients get an answer,
    finish_reason "abort") before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState, loop: EngineLoop, drain_timeout_s: float):
        super().__init__(config)
        self.state, self.loop, self.drain_timeout_s = state, loop, drain_timeout_s

    def handle_exit(self, sig, frame):
        if not self.state.draining:
            self.state.draining = True
            print(
                f"draining: finishing in-flight requests (up to {self.drain_timeout_s:g}s), then stopping", flush=True
            )
            timer = threading.Timer(self.drain_timeout_s, self.loop.abort_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def engine_builder(cfg: ServeConfig, device: str, tp):
    """The function the engine thread (or a follower rank) calls to load the engine."""
    model = ModelConfig(
        model_path=cfg.model_path,
        backend="engine",
        data_type=cfg.data_type,
        **{k: getattr(cfg, k) for k in ENGINE_SETTINGS},
    )
    model.data_type = resolve_data_type(model)
    settings = BackendSettings(
        model=model,
        device=device,
        max_batch_size=cfg.max_batch_size,
        max_input_length=cfg.max_input_length,
        max_output_length=cfg.max_output_length,
    )

    def build() -> LLMEngine:
        if tp.device.type != "cpu":  # the engine thread's current device (CUDA's is per thread)
            import torch

            getattr(torch, tp.device.type).set_device(tp.device)
        return LLMEngine(engine_config(settings), tp)

    return build, model.data_type


def quiet_signals() -> None:
    """uvicorn handles SIGTERM/SIGINT while it runs, then restores the handlers it found and
    raises the signal again: with the defaults that would kill this process (SIGTERM) or raise
    KeyboardInterrupt (SIGINT) before the engine is stopped. Found handlers that only note the
    signal let the shutdown finish. uvicorn also logs cancelling the requests a drain could not
    finish as an error; it is the plan."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logging.getLogger("uvicorn.error").addFilter(lambda r: "timeout graceful shutdown" not in r.getMessage())


def log_to_stderr() -> None:
    """The server's own lines (one per request, and warnings about request fields) on stderr."""
    log = logging.getLogger("modeltest")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_server(cfg: ServeConfig) -> int:
    device = resolve_device(cfg.device)
    check_weight_files(cfg.model_path)
    par = init_parallel(device, 1)
    tp = par.tp_ctx
    channel = Channel(tp.group) if tp.world_size > 1 else None
    build, data_type = engine_builder(cfg, device, tp)
    if not par.is_main:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains, then tells this rank to stop
        follow(build(), channel)
        return 0

    _check_port(cfg.host, cfg.port)
    pre = Preprocessor(cfg)
    state, metrics = ServerState(), ServerMetrics()
    url = f"http://{cfg.host}:{cfg.port}"
    server_box = []

    def ready(_loop) -> None:
        print(f"serving '{cfg.model_name}' at {url}/v1 (health: {url}/health, metrics: {url}/metrics)", flush=True)

    def dead(loop_) -> None:
        # A server without a working engine only answers 503: say why now and stop, so that a
        # supervisor restarts it (requests in flight already got their error).
        print(f"modeltest serve: error: {loop_.error}; stopping", file=sys.stderr, flush=True)
        if server_box:
            server_box[0].should_exit = True

    loop = EngineLoop(build, channel, on_ready=ready, on_dead=dead)
    app = create_app(cfg, loop, pre, metrics, state, data_type)
    log_to_stderr()
    quiet_signals()
    where = f"{device} x {tp.world_size} (tensor parallel)" if tp.world_size > 1 else device
    print(f"loading {cfg.model_path} ({data_type}) on {where} ...", flush=True)
    loop.start()
    config = uvicorn.Config(
        Gatekeeper(app, cfg.api_key, cfg.max_body_bytes),
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(cfg.drain_timeout_s) + 10,
    )
    server = DrainingServer(config, state, loop, cfg.drain_timeout_s)
    server_box.append(server)
    if loop.state == "dead":  # it died before the server existed
        server.should_exit = True
    try:
        server.run()
    finally:
        loop.stop()
        app.state.pool.shutdown(wait=False, cancel_futures=True)
        pre.close()
    if loop.state == "dead":
        return 1
    print("stopped", flush=True)
    return 0 if server.started else 1
