"""Commands that run things: `idlegrid coordinator`, `provide` and `up` (a local grid)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from idlegrid.client.options import DataDir
from idlegrid.client.provide_opts import lease_controls, parse_links
from idlegrid.config import DEFAULT_PORT, default_data_dir

console = Console(stderr=True)
out = Console()
# A provider whose engine died by a signal in its start-up check; `idlegrid up` reports it.
EXIT_ENGINE_CRASHED = 3


LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="Log lines as 'text' or 'json' (one object per line) [env IDLEGRID_LOG_FORMAT].",
    ),
]


def _logging(verbose: bool, log_format: str | None) -> bool:
    """Set up logging; True when lines are JSON (then notes go to the log, not the console)."""
    from idlegrid.logs import LogFormatError, setup_logging
    from idlegrid.logs import log_format as chosen_format

    try:
        fmt = chosen_format(log_format)
    except LogFormatError as exc:
        raise typer.BadParameter(exc.message, param_hint="--log-format") from None
    setup_logging(verbose, fmt)
    return fmt == "json"


def _tracing(service: str) -> None:
    """OpenTelemetry tracing when IDLEGRID_OTEL or an OTLP endpoint asks (idlegrid/tracing.py)."""
    from idlegrid import tracing

    try:
        if tracing.configure_from_env(service):
            logging.getLogger("idlegrid.cli").info("tracing on: spans go by OTLP/HTTP")
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc), param_hint=tracing.ON_ENV) from None


def _note(json_logs: bool, text: str) -> None:
    """A line for the operator: on the console, or a log record when logs are JSON."""
    if json_logs:
        from rich.text import Text

        logging.getLogger("idlegrid.cli").info(Text.from_markup(text).plain)
    else:
        console.print(text)


def coordinator(
    data_dir: DataDir,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on [env IDLEGRID_PORT; default 8700].")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind [env IDLEGRID_HOST; default 127.0.0.1]."),
    ] = None,
    database_url: Annotated[
        str,
        typer.Option(
            help="SQLAlchemy URL (default: SQLite in --data-dir; or IDLEGRID_DATABASE_URL)."
        ),
    ] = "",
    fee_bps: Annotated[int | None, typer.Option(help="Protocol fee in basis points.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's PEM private key.")] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve plain HTTP on a non-loopback address (e.g. behind a TLS "
            "reverse proxy on the same host).",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: LogFormat = None,
) -> None:
    """Run the coordinator: node API, OpenAI gateway, ledger, metrics.

    Every setting also reads its IDLEGRID_ variable (IDLEGRID_HOST, IDLEGRID_PORT,
    IDLEGRID_DATA_DIR, ...); a flag given here wins over it."""
    import ipaddress

    import uvicorn

    from idlegrid.config import LOOPBACK_NAMES, OPERATOR_KEY_FILE, CoordinatorSettings
    from idlegrid.coordinator.app import create_app

    json_logs = _logging(verbose, log_format)
    _tracing("idlegrid-coordinator")
    # Only flags actually given override: a flag default would hide the env twin.
    overrides: dict[str, Any] = {"data_dir": data_dir}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if database_url:
        overrides["database_url"] = database_url
    if fee_bps is not None:
        overrides["fee_bps"] = fee_bps
    settings = CoordinatorSettings(**overrides)
    host, port = settings.host, settings.port
    if bool(tls_cert) != bool(tls_key):
        raise typer.BadParameter("give both --tls-cert and --tls-key", param_hint="--tls-cert")
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not tls_cert and not insecure:
        raise typer.BadParameter(
            f"{host} is reachable from other machines: API keys, the operator key and node "
            "signatures would cross the network in clear text. Give --tls-cert/--tls-key, "
            "or --insecure when a TLS reverse proxy on this host fronts it (docs/deploy.md)",
            param_hint="--host",
        )
    settings.ensure_operator_key()
    _note(
        json_logs,
        f"operator key: {data_dir / OPERATOR_KEY_FILE}"
        if (data_dir / OPERATOR_KEY_FILE).exists()
        else "operator key: from settings",
    )
    from idlegrid.coordinator.edge import guarded_http

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        # uvicorn's own lines go through the root handler (text or JSON), not its formats.
        log_config=None,
        timeout_graceful_shutdown=5,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_keep_alive=5,
        http=guarded_http(settings.header_timeout_s),
    )


def provide(
    coordinator_url: Annotated[str, typer.Option("--coordinator", help="Coordinator URL.")] = (
        f"http://127.0.0.1:{DEFAULT_PORT}"
    ),
    model: Annotated[str, typer.Option(help="Model id to serve.")] = "gemma3:270m",
    model_path: Annotated[
        Path | None, typer.Option(help="Serve this GGUF file as --model.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="Engine name (llama.cpp, torch) or plug-in path module:Class.")
    ] = "llama.cpp",
    threads: Annotated[
        int | None, typer.Option(help="Engine threads (default: all cores).")
    ] = None,
    slots: Annotated[int, typer.Option(help="Requests served at once (one engine each).")] = 1,
    parallel: Annotated[
        int | None,
        typer.Option(
            help="llama.cpp, torch: sequences decoded in one batch (default: from free memory, "
            "at most 8; 0: off, one engine per --slots)."
        ),
    ] = None,
    headroom: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Slots kept for interactive work, which batch lines may not take (default: "
            "one more sequence with llama.cpp batching; else 0, of --slots).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name shown on the grid.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Node key (created if missing).")] = None,
    prompt_price: Annotated[float, typer.Option(help="Credits per 1M prompt tokens.")] = 10.0,
    output_price: Annotated[float, typer.Option(help="Credits per 1M output tokens.")] = 40.0,
    region: Annotated[str, typer.Option(help="Region this provider is in (market).")] = "local",
    device_price: Annotated[
        float | None,
        typer.Option(
            help="Credits per device-hour for leases and training (market); none: not for rent."
        ),
    ] = 0.05,
    stake: Annotated[
        float, typer.Option(help="Credits to stake per device once the balance allows (market).")
    ] = 5.0,
    skip_benchmark: Annotated[bool, typer.Option(help="Do not measure speed at start-up.")] = False,
    drain_grace: Annotated[float, typer.Option(help="Seconds to finish work on SIGTERM.")] = 30.0,
    rated_watts: Annotated[
        float | None,
        typer.Option(help="Device power for the energy estimate when NVML/RAPL cannot be read."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Also audit other providers' answers (same engine and model)."
        ),
    ] = False,
    train: Annotated[
        bool, typer.Option("--train", help="Also run verified training jobs (needs torch).")
    ] = False,
    train_verifier: Annotated[
        bool,
        typer.Option(
            "--train-verifier", help="Re-execute audited training segments (needs torch)."
        ),
    ] = False,
    train_gang_host: Annotated[
        str | None,
        typer.Option(
            "--train-gang-host",
            help="Also join data-parallel training gangs, serving their "
            "rendezvous on this host when rank 0 (an address the other ranks reach).",
        ),
    ] = None,
    link: Annotated[
        list[str] | None,
        typer.Option(
            "--link",
            help="A measured link to another provider, for training gangs: "
            "NODE_ID=GBPS or NODE_ID=GBPS@MS (one-way latency); repeat per peer. "
            "Gangs form only over reported links.",
        ),
    ] = None,
    lease_devices: Annotated[
        str,
        typer.Option(
            help="Device groups leased: all, none, or a comma list (RTX-4090,CPU).",
            envvar="IDLEGRID_LEASE_DEVICES",
        ),
    ] = "all",
    lease_max: Annotated[
        str | None,
        typer.Option(
            help="The most one lease may take, e.g. cpus=4,ram_gb=16,disk_gb=50.",
            envvar="IDLEGRID_LEASE_MAX",
        ),
    ] = None,
    lease_total: Annotated[
        str | None,
        typer.Option(
            help="The most all leases together may take, e.g. cpus=8,ram_gb=32.",
            envvar="IDLEGRID_LEASE_TOTAL",
        ),
    ] = None,
    lease_egress: Annotated[
        bool,
        typer.Option(
            help="Give workspaces outbound internet (egress only; off by default).",
            envvar="IDLEGRID_LEASE_EGRESS",
        ),
    ] = False,
    lease_pip: Annotated[
        bool,
        typer.Option(
            help="Install a lease's --pip requirements in its workspace.",
            envvar="IDLEGRID_LEASE_PIP",
        ),
    ] = True,
    lease_runtimes: Annotated[
        str,
        typer.Option(
            help="Workspace runtimes offered for leases, comma-separated.",
            envvar="IDLEGRID_LEASE_RUNTIMES",
        ),
    ] = "bwrap",
    startup_check: Annotated[
        bool,
        typer.Option(
            help="Load the engine and decode a few tokens in a child first, so that a native "
            "crash (SIGILL, SIGSEGV, OOM kill) is reported with its cause."
        ),
    ] = True,
    workspace_runtime: Annotated[
        str, typer.Option(help="Lease workspaces: bwrap (sandbox) or podman (OCI images).")
    ] = "bwrap",
    workspace_image: Annotated[
        str | None,
        typer.Option(help="podman: the image of leases that name none (one this host has)."),
    ] = None,
    oci_runtime: Annotated[
        str | None, typer.Option(help="podman: its OCI runtime (e.g. runc; default podman's).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    log_format: LogFormat = None,
) -> None:
    """Run a provider agent: probe, load the model, benchmark, then serve work.

    Over https:// the agent trusts IDLEGRID_CA_BUNDLE (a PEM file) when it is set, for the
    API and for its wss:// channel alike (docs/deploy.md)."""
    import asyncio
    import signal
    import socket
    import time

    from idlegrid.agent.agent import Agent, AgentConfig
    from idlegrid.agent.hardware.power import choose_meter
    from idlegrid.agent.hardware.probe import probe
    from idlegrid.agent.node_client import NodeClient
    from idlegrid.agent.slots import build_slots
    from idlegrid.client.progress import make_progress
    from idlegrid.core.ledger import MICRO, Price
    from idlegrid.engines.registry import load_engine
    from idlegrid.protocol.signing import NodeKey

    links, latency = parse_links(link or [])  # refused before anything loads
    json_logs = _logging(verbose, log_format)
    _tracing("idlegrid-provider")
    controls = lease_controls(
        lease_devices, lease_max, lease_total, lease_egress, lease_pip, lease_runtimes
    )
    name = name or socket.gethostname()
    key = NodeKey.load_or_create(key_file or default_data_dir() / "nodes" / f"{name}.key")
    hardware = _as_dict(probe())
    kwargs: dict[str, Any] = {"threads": threads}
    if model_path:
        kwargs["model_path"] = model_path
    if startup_check:
        _check_engine_starts(engine, model, model_path, threads)
    # JSON logs: stderr carries only JSON lines, so the progress bars are not drawn.
    with make_progress(Console(stderr=True, quiet=True) if json_logs else console) as progress:
        task = progress.add_task(f"loading {model} on {engine}", total=slots, rate="")
        bench = None
        began = time.monotonic()

        def step(done: int, total: int) -> None:
            nonlocal bench
            if bench is None:
                bench = progress.add_task("measuring decode speed", total=None, rate="")
            elapsed = time.monotonic() - began
            progress.update(
                bench,
                completed=done,
                total=total,
                rate=f"{done / elapsed:.1f} tok/s" if elapsed > 0 else "",
            )

        built = build_slots(
            lambda: load_engine(engine, model, **kwargs),
            slots=slots,
            parallel=parallel,
            benchmark=not skip_benchmark,
            on_loaded=lambda: progress.advance(task),
            on_token=step,
            **({"headroom": headroom} if headroom is not None else {}),
        )
    engines = built.engines
    prefill, decode = built.prefill_tps, built.decode_tps
    if built.parallel:
        measured = ", ".join(f"{n}: {t:.1f}" for n, t in built.aggregate_tps.items())
        _note(
            json_logs,
            f"batching {built.parallel} sequences, serving {len(engines)} at once"
            + (f" (aggregate tok/s by sequences {measured})" if measured else ""),
        )
    if not skip_benchmark:
        speeds = f"prefill {prefill:.0f} tok/s, decode {decode:.1f} tok/s"
        _note(json_logs, f"[green]measured[/] {speeds}")
    podman = {"image": workspace_image, "oci_runtime": oci_runtime}
    config = AgentConfig(
        name=name,
        hardware=hardware,
        prefill_tps=prefill,
        decode_tps=decode,
        price=Price(round(prompt_price * MICRO), round(output_price * MICRO)),
        drain_grace_s=drain_grace,
        region=region,
        device_price_h=None if device_price is None else round(device_price * MICRO),
        stake_per_device=round(stake * MICRO),
        meter=choose_meter(hardware, rated=rated_watts),
        verifier=verify,
        trainer=train,
        train_verifier=train_verifier,
        train_threads=threads,
        train_gang_host=train_gang_host,
        lease_controls=controls,
        headroom=headroom,
        workspace_runtime=workspace_runtime,
        workspace_options=podman if workspace_runtime == "podman" else {},
        runtime_options={"podman": podman},  # for leases that ask for it by name
    )
    config.links, config.link_latency_ms = links, latency
    meter = config.meter
    assert meter is not None
    _note(
        json_logs,
        f"power: {meter.source}"
        + (" (estimated from rated power)" if meter.estimated else " (measured)"),
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(NodeClient(coordinator_url, key), engines, config)
        _note(
            json_logs,
            f"[bold]{name}[/] ({key.node_id[:12]}) serving {model} via {engine} "
            f"→ {coordinator_url}",
        )
        await agent.run(stop)
        _note(json_logs, f"drained after serving {agent.served} request(s)")

    asyncio.run(main())
    meter.close()
    for e in engines:
        e.close()


def _check_engine_starts(
    engine: str, model: str, model_path: Path | None, threads: int | None
) -> None:
    """Exit with the cause when the engine cannot load and decode (see engines/startup.py)."""
    from idlegrid.engines.startup import check_engine
    from idlegrid.errors import EngineCrashed, EngineError

    with console.status(f"checking that {engine} starts {model}"):
        try:
            check_engine(
                engine, model, model_path=str(model_path) if model_path else None, threads=threads
            )
        except EngineCrashed as exc:
            if exc.data.get("detail"):
                console.print(exc.data["detail"], markup=False, highlight=False)
            console.print(f"[bold red]error:[/] {exc.message}")
            raise typer.Exit(EXIT_ENGINE_CRASHED) from None
        except EngineError as exc:
            console.print(f"[bold red]error:[/] {exc.message}")
            raise typer.Exit(1) from None


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def up(
    data_dir: DataDir,
    providers: Annotated[int, typer.Option(help="Provider agents to start.")] = 2,
    port: Annotated[int, typer.Option(help="Coordinator port.")] = DEFAULT_PORT,
    engine: Annotated[str, typer.Option(help="Engine for every provider.")] = "llama.cpp",
    model: Annotated[str, typer.Option(help="Model every provider serves.")] = "gemma3:270m",
    threads: Annotated[
        int | None, typer.Option(help="Threads per provider (default: cores / providers).")
    ] = None,
    credits: Annotated[int, typer.Option(help="Credits for a new local key.")] = 100,
    train: Annotated[
        bool,
        typer.Option(
            "--train",
            help="Providers also run verified training jobs; the last one re-executes "
            "audited segments instead (needs 2+ providers).",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Providers audit each other's answers (needs 2+ providers)."),
    ] = False,
) -> None:
    """Start a local grid (coordinator + providers), fund a key, serve until Ctrl-C."""
    import signal
    import threading

    from idlegrid.client.localgrid import KEY_FILE, LocalGrid, ProcessExited
    from idlegrid.client.progress import make_progress

    if (train or verify) and providers < 2:
        raise typer.BadParameter(
            "a verifier is never its own auditor: use --providers 2 or more",
            param_hint="--providers",
        )
    grid = LocalGrid(
        data_dir=data_dir,
        port=port,
        providers=providers,
        engine=engine,
        model=model,
        threads=threads,
        funding_credits=credits,
        train=train,
        verify=verify,
    )
    stop = threading.Event()
    failed = False
    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with console.status("starting the coordinator"):
            grid.start_coordinator()
        for i in range(providers):
            grid.start_provider(i)
        with make_progress(console) as progress:
            task = progress.add_task(
                f"loading {model} and benchmarking providers", total=providers, rate=""
            )
            grid.wait_for_providers(
                providers, on_poll=lambda live: progress.update(task, completed=live)
            )
        grid.fund_consumer()
        grid.fund_providers()  # so their device-hours enter the market staked
        out.print(f"[bold green]idlegrid is up[/] with {providers} provider(s) serving {model}")
        out.print(f"  base URL : {grid.url}/v1")
        out.print(f"  API key  : {grid.api_key}  (saved to {data_dir / KEY_FILE})")
        out.print(f"  logs     : {data_dir / 'logs'}")
        out.print("  try      : idlegrid complete 'The capital of France is'")
        if train:
            out.print("  train    : idlegrid train run   (the small GPT on stdlib text, verified)")
        out.print("Ctrl-C stops everything.")
        sys.stdout.flush()
        while not stop.wait(0.5):  # supervise: a child that dies is restarted with backoff
            for line in grid.supervise():
                console.print(f"[yellow]{line}[/]")
    except KeyboardInterrupt:
        pass
    except ProcessExited as exc:
        console.print(
            f"[bold red]error:[/] {exc.name} {exc.how} before the grid was up; "
            f"last lines of {exc.log}:"
        )
        console.print(exc.tail, markup=False, highlight=False)
        failed = True
    finally:
        console.print("stopping: providers drain, then the coordinator")
        grid.stop()
    if failed:
        raise typer.Exit(1)
