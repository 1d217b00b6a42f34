"""Starting and stopping genpi's Serve app: `genpi serve`, `jobs/serve.py` (`ray job stop`
sends SIGTERM), and the benchmarks."""
import contextlib
import logging
import signal
import threading
import time

from ray import serve

from genpi.config import GenpiConfig
from genpi.serve.adapters import export_lora_layout
from genpi.serve.config import APP_NAME, app_args_config, llm_app_config

log = logging.getLogger("genpi.serve")


_sigterm_blocks = 0  # how many sigterm_as_interrupt blocks are open (main thread only)


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up; SIGKILL still ends it
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside this block SIGTERM (`ray job stop`, Kubernetes) raises KeyboardInterrupt, so
    Ctrl-C's clean-up runs for it too. ray.init replaces the SIGTERM handler with Ray's (the
    driver then aborts, deleting nothing): start() reinstalls this one after ray.init while a
    block is open. Later SIGTERMs are ignored so the clean-up is not cut short (SIGKILL still
    ends it). A no-op outside the main thread, where Python cannot install handlers."""
    global _sigterm_blocks
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    _sigterm_blocks += 1
    try:
        yield
    finally:
        _sigterm_blocks -= 1
        signal.signal(signal.SIGTERM, previous)


def stop() -> None:
    """Delete genpi's app, not other Serve apps of a shared cluster (as serve.shutdown would).
    The controller finishes the deletion alone: no waiting (a stopped job gets 3 s)."""
    serve.delete(APP_NAME, _blocking=False)


def start(cfg: GenpiConfig, blocking: bool = True) -> str:
    """Start Ray (or join cfg.cluster.address / RAY_ADDRESS) and run the app; returns the base URL.

    Blocking: serve until Ctrl-C or SIGTERM (`ray job stop`), then delete the app (stop()) and
    return normally, so the process exits 0 like Ray's own `serve run` after Ctrl-C.
    """
    from genpi.rayinit import ensure_ray

    ensure_ray(cfg.cluster, configure_logging=False)
    if _sigterm_blocks and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init replaced it (see sigterm_as_interrupt)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    if s.backend == "vllm":
        try:
            from ray.serve.llm import build_openai_app
        except ImportError as e:
            from genpi.config import ConfigError

            raise ConfigError(f"serve.backend=vllm needs vLLM and Ray Serve LLM: pip install -e '.[gpu]' ({e})") from None
        export_lora_layout(cfg)
        app = build_openai_app(llm_app_config(cfg)["args"])
    else:
        from genpi.serve.app import build_app

        app = build_app({"config": app_args_config(cfg)})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except KeyboardInterrupt:  # stopped while deploying: leave nothing half-deployed behind
        stop()
        raise
    url = f"http://{s.host}:{s.port}"
    log.info("genpi serving at %s/v1 (models: %s/v1/models)", url, url)
    if blocking:
        serve_until_stopped()
    return url


def serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM, then delete genpi's app (stop())."""
    with sigterm_as_interrupt():
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stopping: deleting the Serve app %r", APP_NAME)
        finally:
            stop()
