"""The `hearth` command."""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from hearth.logs import configure
from hearth.memory import keep_freed_memory
from hearth.settings import Settings
from hearth.threads import openmp_environment

if TYPE_CHECKING:  # the registry is imported where it is used: `hearth --help` stays quick
    from models.registry import ModelSpec, Registry

app = typer.Typer(
    help="Hearth: text embeddings and generated images over HTTP, jobs queued in Redis.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="The models Hearth can serve.", no_args_is_help=True)
app.add_typer(models_app, name="models")

HostOption = Annotated[str | None, typer.Option(help="Address to listen on [default: HEARTH_HOST]")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on [default: HEARTH_PORT]")]


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad variable ends the command, named."""
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            variable = "REDIS_URL" if name == "REDIS_URL" else f"HEARTH_{name}"
            typer.echo(f"error: {variable}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def scan_models(settings: Settings) -> Registry:
    """The model registry; a models.yaml that cannot be followed ends the command, named."""
    from models.registry import ModelsFileError, Registry

    try:
        return Registry.scan(settings.model_store)
    except ModelsFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def select_models(settings: Settings) -> list[ModelSpec]:
    """The models HEARTH_MODELS names (every model when empty); an unknown one ends
    the command, named."""
    from models.registry import UnknownModelError

    try:
        return scan_models(settings).select(settings.models)
    except UnknownModelError as exc:
        typer.echo(
            f"error: unknown model {exc.model_id!r}; `hearth models list` shows them", err=True
        )
        raise typer.Exit(2) from None


@app.command()
def serve(host: HostOption = None, port: PortOption = None) -> None:
    """Run everything: a private Redis (unless REDIS_URL is set), the API and one worker."""
    from hearth.serve import serve as run_all

    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    select_models(settings)  # a models.yaml or HEARTH_MODELS that cannot be followed stops here
    raise typer.Exit(run_all(settings, host or settings.host, port or settings.port))


@app.command()
def api(host: HostOption = None, port: PortOption = None) -> None:
    """Run the HTTP API (needs REDIS_URL)."""
    import uvicorn

    from app.main import create_app
    from hearth.http import HttpProtocol

    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    # uvicorn re-raises the signal it stopped on once it has shut down cleanly;
    # SIGTERM is the normal way to stop the API, so that ends with exit code 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    select_models(settings)
    try:
        application = create_app(settings)
    except OSError as exc:
        typer.echo(f"error: HEARTH_API_KEYS_FILE: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(
        application,
        host=host or settings.host,
        port=port or settings.port,
        loop="uvloop",
        http=HttpProtocol,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through Hearth's own (JSON) handler
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )


@app.command()
def worker(
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated model ids [default: HEARTH_MODELS, else all]"),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N [default: HEARTH_DEVICE]")
    ] = None,
) -> None:
    """Run a worker: load models warm, then take their jobs from Redis (needs REDIS_URL)."""
    from models.registry import ModelKind

    settings = load_settings(models=models, device=device)
    configure(settings.log_level, settings.log_format)
    specs = select_models(settings)  # reads configs only: torch is not loaded yet
    only_images = all(spec.kind is ModelKind.IMAGE for spec in specs)
    os.environ.update(openmp_environment(settings.pin_threads, short_spin=not only_images))
    if settings.keep_freed_memory:
        keep_freed_memory()
    from models import library_logs

    # Before diffusers is imported: its pipeline modules warn as they load.
    images = any(spec.kind is ModelKind.IMAGE for spec in specs)
    library_logs.adopt("transformers", *(["diffusers"] if images else []))
    import uvloop

    from workers.worker import Worker

    uvloop.run(Worker(settings, specs, settings.device).run())


@models_app.command("demo")
def demo_models(
    overwrite: Annotated[bool, typer.Option(help="Rebuild folders that exist already")] = False,
) -> None:
    """Write the small random-weight demo pipelines (demo-unet, demo-dit) into the model store."""
    from models.demo import build_demo_models

    settings = load_settings()
    written = build_demo_models(settings.model_store, overwrite=overwrite)
    for folder in written:
        typer.echo(f"wrote {folder}")
    if not written:
        typer.echo(f"the demo models are already in {settings.model_store} (--overwrite rebuilds)")


@models_app.command("list")
def list_models() -> None:
    """List the model ids the registry finds, with their kind, folder and aliases."""
    settings = load_settings()
    registry = scan_models(settings)
    for spec in registry:
        if spec.image is not None:
            size = f"{spec.image.default_width}x{spec.image.default_height}"
            shape = f"{size} (up to {spec.image.max_width}x{spec.image.max_height})"
        else:
            shape = f"{spec.dimension} dims"
        aliases = f"\taliases: {', '.join(spec.aliases)}" if spec.aliases else ""
        typer.echo(f"{spec.id}\t{spec.kind.value}\t{shape}\t{spec.path}{aliases}")
    for name, reason in registry.skipped.items():
        typer.echo(f"{name}\tskipped: {reason}", err=True)
