"""krasis-coord: the command line of the coordinator.

    krasis-coord generate MODEL --prompt "..." --max-new-tokens 32     one shot, then exit
    krasis-coord serve MODEL --zmq tcp://127.0.0.1:5555                the long-running service
    krasis-coord chat --connect tcp://127.0.0.1:5555                   an interactive client
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from typing import TYPE_CHECKING

import click

from ..shared.keys import KeysError, require_keys
from ..shared.strategy_names import DECODE_STRATEGIES, StrategyError, parse_prefill
from .config import config_option
from .processes import Prestarted, RuntimeOptions, WorkerDied

if TYPE_CHECKING:
    from .engine import Engine

# Only light modules above: the commands that start workers start their zygote (Prestarted), which
# imports torch for the workers, before anything here imports it (as long again: 5 s on the H100
# host), so the modules that import it are imported where they are used.


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports in one line (exit 1) rather than a traceback."""
    from ..shared import protocol as P
    from ..shared.models.family import ConfigError
    from ..shared.quant import QuantError
    from ..shared.weight_cache import CacheError
    from ..shared.weights import WeightError
    from .engine import RequestError
    from .plan import PlanError
    from .tokenizer import TokenizerError

    return (ConfigError, WeightError, PlanError, RequestError, TokenizerError, P.ProtocolError, WorkerDied,
            CacheError, QuantError)


def _prestart(model: str, opts: RuntimeOptions) -> Prestarted:
    """Start the run's workers now, before this process builds its engine (processes.py: Prestarted);
    those the engine never takes are killed when the command ends, however it ends."""
    return click.get_current_context().with_resource(Prestarted.for_run(model, opts))


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _count_list(ctx, param, value):
    """A comma-separated list of counts (each at least 1), or None when not given."""
    counts = _int_list(ctx, param, value)
    if counts is not None and (not counts or min(counts) < 1):
        raise click.BadParameter(f"{value!r}: give one or more counts of at least 1, comma-separated")
    return counts


def _stream_decode_mode(ctx, param, value):
    if value in ("auto", "off", "always") or value.isdigit():
        return value
    raise click.BadParameter(f"{value!r}: one of auto, off, always, or a number of layers")


def _prefill_strategy(ctx, param, value):
    if value is not None:
        try:
            parse_prefill(value)
        except StrategyError as e:
            raise click.BadParameter(str(e)) from None
    return value


BITS = click.Choice(["4", "8", "16"])
# A model folder or GGUF file that is not there is a usage error before any worker starts (the
# workers' imports took a refused run 4 s on two cores); what it holds is read later. serve and check
# take their model from a --config file too, so they check it where they need it.
MODEL_PATH = click.Path(exists=True)


def quant_options(f):
    """Weight precision and cache options (docs/quantization.md), handed on as `quant`, a dict of
    RuntimeOptions fields."""

    @click.option("--gpu-bits", type=BITS, default="16", show_default=True,
                  help="Routed experts as the GPU workers run them (prefill): INT4, INT8, or 16 = unquantized.")
    @click.option("--cpu-bits", type=BITS, default="16", show_default=True,
                  help="Routed experts in the CPU pool's shared store (decode): INT4, INT8, or 16 = unquantized.")
    @click.option("--attn-bits", type=click.Choice(["8", "16"]), default="16", show_default=True,
                  help="Dense GPU weights (attention, shared experts, dense MLPs, lm_head): INT8 per output "
                       "channel, or 16 = unquantized. Routers, norms and embeddings are never quantized.")
    @click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True,
                  help="Expert quantization group along the input dimension.")
    @click.option("--cache-dir", type=click.Path(file_okay=False),
                  help="Where the weight caches live (default: MODEL/.krasis_cache, or ~/.cache/krasis/NAME-HASH "
                       "if the model folder is read-only; docs/quantization.md).")
    @click.option("--rebuild", is_flag=True, help="Rebuild the weight caches even if they look current "
                                                  "(the way to replace a corrupt one).")
    @click.option("--gguf", type=click.Path(dir_okay=False),
                  help="Read the routed experts from this GGUF file instead of MODEL (everything else from MODEL, "
                       "which may itself be a .gguf file holding everything).")
    @functools.wraps(f)
    def wrapper(*args, gpu_bits, cpu_bits, attn_bits, group_size, cache_dir, rebuild, gguf, **kw):
        quant = dict(gpu_bits=int(gpu_bits), cpu_bits=int(cpu_bits), attn_bits=int(attn_bits),
                     group_size=group_size, cache_dir=cache_dir, rebuild=rebuild, gguf=gguf)
        return f(*args, quant=quant, **kw)

    return wrapper


def _endpoints(ctx, param, value):
    return [e.strip() for e in value.split(",") if e.strip()] if value else None


def host_options(f):
    """Across machines (docs/deployment.md), handed on as `hosts`, a dict of RuntimeOptions fields.
    A tcp endpoint beyond loopback without --keys is refused unless --insecure."""

    @click.option("--hosts", callback=_endpoints,
                  help="Host agents (krasis-coord host) to run the stages on, comma-separated: tcp://A:7000,tcp://B:7000. "
                       "Stages go in this order, then each host's --devices order; --devices is then unused.")
    @click.option("--keys", type=click.Path(file_okay=False, exists=True),
                  help="CURVE keys folder (krasis-coord keygen DIR): every tcp socket is encrypted and authenticated.")
    @click.option("--heartbeat-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
                  help="Heartbeat period with the host agents; one silent for 3 periods counts as lost.")
    @click.option("--insecure", is_flag=True, help="Allow tcp beyond loopback without --keys (a network you trust).")
    @functools.wraps(f)
    def wrapper(*args, hosts, keys, heartbeat_s, insecure, **kw):
        try:  # the agents' endpoints, and serve's client endpoint (its --zmq)
            require_keys([*(hosts or []), *filter(None, [kw.get("endpoint")])], keys, insecure)
        except KeysError as e:
            _fail(e)
        return f(*args, hosts=dict(hosts=hosts, keys=keys, heartbeat_s=heartbeat_s), **kw)

    return wrapper


def runtime_options(f):
    """Options shared by every command that runs the model."""

    @click.option("--devices", default="cpu", show_default=True,
                  help="Comma-separated devices, one pipeline stage (process) each: cuda:0,cuda:1 or cpu,cpu.")
    @click.option("--pp-layers", callback=_int_list, help="Layers per stage, e.g. 14,13 (default: balanced by cost).")
    @click.option("--cpu-workers", type=click.IntRange(min=1), help="CPU expert pool processes (default: one per NUMA node).")
    @click.option("--numa-nodes", type=click.IntRange(min=1), help="Simulate this many NUMA nodes (splits the cores).")
    @click.option("--dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default="bfloat16", show_default=True,
                  help="Compute dtype; float32 is the exact-check mode.")
    @click.option("--max-context", type=click.IntRange(min=2), default=4096, show_default=True,
                  help="Longest sequence (prompt + generated) served.")
    @click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Most sequences decoded together.")
    @click.option("--prefill-chunk", type=click.IntRange(min=1), default=4096, show_default=True,
                  help="Prompt tokens the GPU runs through a layer at a time: bounds activation and attention "
                  "memory only (a prefill step holds whole prompts, and streamed experts cross PCIe once per step).")
    @click.option("--prefill-strategy", callback=_prefill_strategy,
                  help="persistent | layer_grouped_N | chunked | active_only | hcs_prefill "
                  "(docs/strategies.md; default: the winner of `optimize`, else persistent if every expert "
                  "fits --vram-budget, else layer_grouped_1, then chunked: the first that fits).")
    @click.option("--decode-strategy", type=click.Choice(DECODE_STRATEGIES),
                  help="Who runs decode's routed experts (default: the winner of `optimize`, else pure_cpu).")
    @click.option("--stream-decode", default="auto", show_default=True, callback=_stream_decode_mode,
                  help="Run a decode step's routed experts as prefill does (streamed over PCIe, the batch on the GPU), "
                  "for all the layers the prefill strategy streams or for some while the CPU pool runs the rest, when "
                  "that is faster for its batch size: auto measures per batch size on a GPU, where --gpu-bits equals "
                  "--cpu-bits (else the two would compute with different weights); off never; always all of them in "
                  "every decode step; N: N of them in every decode step (docs/strategies.md).")
    @click.option("--resident-decode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="Decode the routed experts of the layers the prefill strategy keeps in VRAM on the GPU, not "
                  "the CPU pool: auto is on for a GPU.")
    @click.option("--pcie-share", type=click.FloatRange(min=0, max=1),
                  help="Share of the CPU pool's chosen experts of each decode layer that the GPU reads from host memory "
                  "over PCIe and computes itself while the pool computes the rest (pure_cpu and hcs_hybrid; 0: off; "
                  "default: auto, docs/strategies.md).")
    @click.option("--vram-budget", type=click.FloatRange(min=0, min_open=True),
                  help="GB of device memory per GPU for weights, KV cache, staging, activations and hot experts.")
    @click.option("--kv-dtype", type=click.Choice(["auto", "fp8", "bf16"]), default="auto", show_default=True,
                  help="KV cache: FP8 e4m3 with per-row scales, or the compute dtype; auto is fp8 except with --dtype float32.")
    @click.option("--lookahead-kb", type=click.IntRange(min=0),
                  help="KiB of the next layer's likely experts each CPU pool thread reads into its caches while the "
                  "GPU runs its part of a decode layer (default: one core's L2; 0: off).")
    @click.option("--reserved-cores", type=click.IntRange(min=0),
                  help="Cores kept off the CPU pool for the GPU workers and the coordinator, from the end of the first "
                  "NUMA node (default: one per GPU worker plus one, where the pool keeps three quarters of the cores).")
    @quant_options
    @host_options
    @functools.wraps(f)
    def wrapper(*args, devices, pp_layers, cpu_workers, numa_nodes, dtype, max_context, max_batch, prefill_chunk, quant,
                prefill_strategy, decode_strategy, stream_decode, resident_decode, pcie_share, vram_budget, kv_dtype,
                lookahead_kb, reserved_cores, hosts, **kw):
        opts = RuntimeOptions(**hosts,
            devices=[d.strip() for d in devices.split(",") if d.strip()], pp_layers=pp_layers,
            cpu_workers=cpu_workers, numa_nodes=numa_nodes, dtype=dtype, max_context=max_context,
            max_batch=max_batch, prefill_chunk=prefill_chunk, **quant, prefill_strategy=prefill_strategy,
            decode_strategy=decode_strategy, stream_decode=stream_decode, resident_decode=resident_decode,
            pcie_share=pcie_share, vram_budget=vram_budget, kv_dtype=kv_dtype, lookahead_kb=lookahead_kb, reserved_cores=reserved_cores,
        )
        return f(*args, opts=opts, **kw)

    return wrapper


def _fail(e: BaseException) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


async def _with_engine(model: str, opts: RuntimeOptions, body, drain: asyncio.Event | None = None, **engine_kw):
    """Run `body(engine)` with every process started, stopping them all whatever happens
    (SIGINT and SIGTERM included). With `drain` (serve), the first signal once the workers are up
    sets it, for `body` to drain; a second one, or one during start-up, stops at once."""
    from .engine import Engine

    engine = Engine(model, opts, **engine_kw)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    up = False

    def on_signal():
        if drain is not None and up and not drain.is_set():
            drain.set()
        else:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await engine.start()
        up = True
        return await body(engine)
    finally:
        await engine.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Krasis: MoE inference with the prompt on the GPU and routed experts on the CPU."""


@main.command()
@click.argument("model", type=MODEL_PATH)
@click.option("--prompt", help="Prompt text (tokenized with the model's tokenizer).")
@click.option("--prompt-ids", callback=_int_list, help="Prompt token ids, comma-separated.")
@click.option("--messages", help='Chat messages as JSON: [{"role": "user", "content": "..."}].')
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for sampling (reproducible).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and timings.")
@runtime_options
def generate(model, prompt, prompt_ids, messages, max_new_tokens, temperature, top_k, top_p, seed, stop, as_json, opts):
    """Start every process, generate once, print, stop every process."""
    # what the options and the request alone decide is refused before any process starts
    if sum(v is not None for v in (prompt, prompt_ids, messages)) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-ids, --messages")
    try:
        msgs = json.loads(messages) if messages is not None else None
    except json.JSONDecodeError as e:
        from ..shared.models.family import ConfigError

        _fail(ConfigError(f"--messages is not valid JSON: {e}"))
    from ..shared import protocol as P

    gen = P.Generate(
        id="cli", prompt=prompt, prompt_ids=prompt_ids, messages=msgs,
        sampling=P.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, stop=list(stop)),
    )
    try:
        gen.validate()
    except P.ProtocolError as e:
        _fail(e)
    prestarted = _prestart(model, opts)
    from .engine import RequestError, run

    async def body(engine: Engine):
        ids, text, done = [], [], None
        async for ev in engine.generate(gen):
            if isinstance(ev, P.Tokens):
                ids += ev.token_ids
                text.append(ev.text)
                if not as_json:
                    click.echo(ev.text, nl=False)
            elif isinstance(ev, P.Error):
                raise RequestError(ev.message)
            else:
                done = ev
        if as_json:
            click.echo(json.dumps({
                "token_ids": ids, "text": "".join(text), "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens, "ttft_s": done.ttft_s,
                "prefill_tok_s": done.prefill_tok_s, "decode_tok_s": done.decode_tok_s,
            }))
        else:
            click.echo()

    try:
        run(_with_engine(model, opts, body, prestarted=prestarted))
    except _user_errors() as e:
        _fail(e)
    except asyncio.CancelledError:
        _fail(RuntimeError("interrupted"))


@main.command()
@click.argument("model", type=MODEL_PATH)
@quant_options
def convert(model, quant):
    """Build the weight caches that these precisions need, one layer at a time; current caches are
    reused after a full checksum verification."""
    from ..shared.weights import load_family
    from .convert import prepare

    try:
        family = load_family(model)
        caches = prepare(model, family, RuntimeOptions(**quant), verify=True)
    except _user_errors() as e:
        _fail(e)
    if caches.cpu is None and caches.gpu is None and caches.dense is None:
        click.echo("convert: nothing to build: --gpu-bits, --cpu-bits and --attn-bits are all 16 (unquantized)", err=True)


def _host_port(ctx, param, value):
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _api_keys(key: str | None, key_file: str | None) -> list[str]:
    """--api-key and the keys of --api-key-file (one per line; blank lines and # comments skipped)."""
    keys = [key] if key else []
    if key_file:
        try:
            with open(key_file) as f:
                keys += [k for k in (line.strip() for line in f) if k and not k.startswith("#")]
        except OSError as e:
            from ..shared.models.family import ConfigError

            raise ConfigError(f"--api-key-file {key_file}: {e.strerror or e}") from None
        if not keys:
            raise ConfigError(f"--api-key-file {key_file} holds no key")
    return keys


@main.command()
@click.argument("model", type=click.Path())
@config_option
@click.option("--print-config", is_flag=True, help="Print the options in effect, as a --config file, and exit.")
@click.option("--zmq", "endpoint", default="tcp://127.0.0.1:5555", show_default=True,
              help="Client endpoint (tcp://host:port or ipc://path).")
@click.option("--http", "http_addr", callback=_host_port,
              help="Also serve the OpenAI-compatible HTTP API on HOST:PORT (docs/openai_api.md); off by default.")
@click.option("--served-model-name", help="The model name the HTTP API answers to (default: MODEL's basename).")
@click.option("--api-key", envvar="KRASIS_API_KEY", show_envvar=True,
              help="Require this key on the HTTP API's /v1/ paths, sent as 'Authorization: Bearer KEY' "
                   "(/health and /metrics stay open).")
@click.option("--api-key-file", type=click.Path(dir_okay=False),
              help="Require one of the keys in this file (one per line), as --api-key.")
@click.option("--metrics", "metrics_addr", callback=_host_port,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (with --http they are also on its "
                   "port; docs/metrics.md).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="When a worker dies, restart all workers and replay their requests, at most this many "
                   "times in 10 minutes (a failed start is retried with backoff and counts too); past that "
                   "(or with 0) exit non-zero, for systemd's Restart= to take over.")
@click.option("--max-replays", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times a request is prefilled again from its prompt and tokens so far after its workers died; "
                   "one lost more often fails with an error that says so.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most requests waiting to start; beyond it new ones are refused (HTTP 429 with Retry-After).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Seconds that SIGTERM or Ctrl-C lets taken requests finish (new ones get 503 / 'draining') "
                   "before the rest are cut with an error; keep it below systemd's TimeoutStopSec.")
@runtime_options
def serve(model, print_config, endpoint, http_addr, served_model_name, api_key, api_key_file, metrics_addr,
          max_restarts, max_replays, max_queue, drain_timeout, opts):
    """Run the service until SIGTERM or Ctrl-C, which drain it (a second one stops at once)."""
    if print_config:
        from .config import effective

        click.echo(effective(click.get_current_context()), nl=False)
        return
    # checked only now: a config file may name a model that is not there yet (--print-config, check)
    MODEL_PATH.convert(model, None, click.get_current_context())
    prestarted = _prestart(model, opts)
    from ..shared.models.family import ConfigError
    from .check import fits_in_ram
    from .engine import run
    from .server import Server

    try:
        keys = _api_keys(api_key, api_key_file)
        if keys and not http_addr:
            raise ConfigError("--api-key protects the HTTP API: add --http HOST:PORT (the ZeroMQ front end has no keys)")
        fits_in_ram(model, opts)
    except _user_errors() as e:
        _fail(e)
    drain = asyncio.Event()

    async def body(engine: Engine):
        server = Server(engine, endpoint)
        click.echo(f"krasis: serving {model} on {endpoint}", err=True)
        http = None
        if http_addr:
            from pathlib import Path

            from .openai_api import OpenAIServer

            http = OpenAIServer(engine, served_model_name or Path(model).name, keys)
            await _listen(http, "--http", http_addr)
            click.echo(f"krasis: OpenAI API for '{http.model}' on http://{http_addr[0]}:{http_addr[1]}/v1"
                       f"{' (API keys required)' if keys else ''}", err=True)
        if metrics_addr:
            from .metrics import MetricsServer

            http_metrics = MetricsServer(engine.metrics)
            await _listen(http_metrics, "--metrics", metrics_addr)
            click.echo(f"krasis: metrics on http://{metrics_addr[0]}:{metrics_addr[1]}/metrics", err=True)
        serving = asyncio.create_task(server.serve())
        fatal = asyncio.create_task(_until_fatal(engine))
        draining = asyncio.create_task(drain.wait())
        cut = 0
        try:
            done, _ = await asyncio.wait({serving, fatal, draining}, return_when=asyncio.FIRST_COMPLETED)
            if draining in done:
                click.echo(f"krasis: draining (up to {drain_timeout:g} s; a second signal stops at once)", err=True)
                cut = await engine.drain(drain_timeout)
                await server.flush()
        finally:
            # what is still open ends with an error that says it was cut, written before the front
            # ends close (never a finish_reason that calls a cut answer complete)
            engine.fail_all("cut: the service is stopping")
            await server.flush()
            serving.cancel()
            draining.cancel()
            if http:
                await http.stop()
            if metrics_addr:
                await http_metrics.stop()
        if fatal in done and engine._fatal is not None:
            raise WorkerDied(str(engine._fatal))
        if serving in done:
            serving.result()  # the front end only ends by an error: surface it (exit non-zero)
        return cut

    try:
        cut = run(_with_engine(model, opts, body, drain, max_restarts=max_restarts, max_replays=max_replays,
                               max_queue=max_queue, prestarted=prestarted))
    except _user_errors() as e:
        _fail(e)
    except asyncio.CancelledError:
        click.echo("krasis: stopped", err=True)
        return
    if cut:
        click.echo(f"krasis: stopped; {cut} request(s) cut at --drain-timeout", err=True)
        sys.exit(1)
    click.echo("krasis: stopped", err=True)


async def _listen(site, option: str, addr: tuple[str, int]) -> None:
    try:
        await site.start(*addr)
    except OSError as e:
        from ..shared.models.family import ConfigError

        raise ConfigError(f"{option} {addr[0]}:{addr[1]}: {e.strerror or e}") from None


async def _until_fatal(engine: Engine):
    while engine._fatal is None:
        await asyncio.sleep(0.25)


@main.command()
@click.argument("model", required=False, type=click.Path())
@config_option
@runtime_options
def check(model, opts, **serve_options):
    """Check this machine, and MODEL with the options serve would get (any serve option is taken),
    before a run: RAM, VRAM, disk for the caches, the memlock limit, hugepages, the CPU governor, NUMA,
    the pool's kernel, PCIe links and the ports. Prints a table with a fix for each failing line; exits
    1 if something would fail."""
    from .check import run_checks, table

    ports = {"--http": serve_options.get("http_addr"), "--metrics": serve_options.get("metrics_addr")}
    try:
        lines = run_checks(model, opts, ports)
    except _user_errors() as e:
        _fail(e)
    click.echo(table(lines))
    sys.exit(1 if any(line.status == "fail" for line in lines) else 0)


# check takes serve's own options too, so that a serve command line with `check` for `serve` checks that run
check.params += [p for p in serve.params if p.name not in {q.name for q in check.params} | {"print_config"}]


@main.command()
@click.option("--connect", "endpoint", default="tcp://127.0.0.1:5555", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--system", help="System prompt.")
@click.option("--keys", type=click.Path(file_okay=False, exists=True),
              help="Client keys folder for a service run with --keys (docs/deployment.md).")
def chat(endpoint, max_new_tokens, temperature, system, keys):
    """Interactive chat with a running service; replies stream as they are generated."""
    from ..shared import protocol as P
    from ..shared.client import Client, ServiceError

    history = [{"role": "system", "content": system}] if system else []
    with Client(endpoint, keys=keys) as c:
        try:
            c.sock.setsockopt(__import__("zmq").RCVTIMEO, 5000)
            c.health()
            c.sock.setsockopt(__import__("zmq").RCVTIMEO, 600_000)
        except TimeoutError:
            _fail(RuntimeError(f"no service answers at {endpoint}"))
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = []
            try:
                for ev in c.stream(messages=history, max_new_tokens=max_new_tokens, temperature=temperature):
                    if isinstance(ev, P.Tokens):
                        reply.append(ev.text)
                        click.echo(ev.text, nl=False)
                    elif isinstance(ev, P.Error):
                        raise ServiceError(ev.message)
            except ServiceError as e:
                click.echo(f"\nerror: {e}", err=True)
                history.pop()
                continue
            click.echo()
            history.append({"role": "assistant", "content": "".join(reply)})


def _status_text(endpoint: str, health, stats: dict) -> str:
    """status's table: the service's state, each worker (its process, where it runs, what it runs),
    the hosts, and the counters an operator reads first."""
    lines = [f"{endpoint}: {health.status} (model {health.model})", "workers:"]
    for w in stats.get("workers") or health.workers:
        if w["role"] == "cpu":
            size = w.get("bytes", 0)
            size = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            what = f"expert store {size} ({w.get('store', 'filled')}), {w.get('experts', '')}"
        else:
            a, b = w.get("layers", [0, 0])
            what = (f"{w.get('device', '?')}, layer{f' {a}' if b == a + 1 else f's {a}-{b - 1}'}, "
                    f"prefill {w.get('prefill_strategy', '?')}, decode {w.get('decode_strategy', '?')}")
        where = f"  on {w['host']}" if w.get("host") else ""
        lines.append(f"  {w['role']} {w['rank']}  pid {w['pid']}  {what}{where}")
    for h in health.hosts:
        lines.append(f"host {h['host'] or '?'} {h['endpoint']}: {h['state']}, last heard {h['last_heard_s']:.1f} s ago")
    lines += [f"requests: {stats['completed']} completed, {stats['errors']} errors, {stats['running']} running, "
              f"{stats['waiting']} waiting",
              f"tokens: {stats['prompt_tokens']:,} prompt, {stats['generated_tokens']:,} generated",
              f"restarts: {stats['restarts']} ({stats.get('restart_s', 0.0):.2f} s in all), "
              f"{stats['replays']} requests replayed"]
    return "\n".join(lines)


@main.command()
@click.option("--connect", "endpoint", default="tcp://127.0.0.1:5555", show_default=True)
@click.option("--keys", type=click.Path(file_okay=False, exists=True),
              help="Client keys folder for a service run with --keys (docs/deployment.md).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the health and stats replies as one JSON object.")
def status(endpoint, keys, timeout, as_json):
    """A running service's health and counters: its workers (process, device, layers, strategies, the
    pool's store), hosts, requests, tokens and restarts. Exits 0 when it serves (health "ok"), 1 when
    it is restarting, draining or down, 2 when nothing answers within --timeout: a monitor can run it."""
    from ..shared.client import Client

    with Client(endpoint, timeout_s=timeout, keys=keys) as c:
        try:
            health, stats = c.health(), c.stats().stats
        except TimeoutError:
            click.echo(f"krasis: no service answered at {endpoint} within {timeout:g} s", err=True)
            sys.exit(2)
    if as_json:
        click.echo(json.dumps({"health": {k: getattr(health, k) for k in ("status", "model", "workers", "hosts")},
                               "stats": stats}))
    else:
        click.echo(_status_text(endpoint, health, stats))
    sys.exit(0 if health.status == "ok" else 1)


@main.command()
@click.argument("model", type=MODEL_PATH)
@click.option("--prompt-tokens", "--prompt-lens", "prompt_lens", callback=_count_list, default="10000", show_default=True,
              help="Prompt length (random token ids, seeded); several, comma-separated, give one row each "
                   "from one start of the processes.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens decoded per run.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs of each prompt length (after one warm-up of that length).")
@click.option("--concurrency", callback=_count_list,
              help="Also decode this many sequences together (comma-separated counts, e.g. 1,4,16,32; each sequence "
                   "with the row's prompt length): the aggregate and per-sequence decode tok/s, one line per count.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False),
              help="Also write the figures to this JSON file (a list of rows when there are several prompt lengths).")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Decode sampling temperature (each request seeded); 0 is greedy, which on a random-weight model "
                   "soon repeats one token and so routes every step to the same experts.")
@click.option("--seed", type=int, help="Seed of the random prompts (default: a new one each run, recorded in the JSON; "
              "the same prompts each run would give a hot set made from the very prompts measured).")
@runtime_options
def bench(model, prompt_lens, decode_tokens, runs, concurrency, json_file, temperature, seed, opts):
    """Prefill and decode speed in the reference's table, with this machine's floor and the fraction reached."""
    from .bench import concurrency_table, decode_split, route_lines, run_benches, table

    try:
        rows = run_benches(model, opts, prompt_lens, decode_tokens, runs, concurrency or [], temperature=temperature,
                           seed=seed, prestarted=_prestart(model, opts))
    except _user_errors() as e:
        _fail(e)
    if json_file:
        with open(json_file, "w") as f:
            json.dump(rows[0] if len(rows) == 1 else rows, f, indent=1, default=str)
    click.echo(table(rows))
    for r in rows:
        split = decode_split(r)
        click.echo(split if len(rows) == 1 else f"prompt {r['prompt_tokens']} tokens: " + split)
    if concurrency:
        click.echo(concurrency_table(rows))
        routes = route_lines(rows)
        if routes:
            click.echo(routes)


@main.command()
@click.argument("model", type=MODEL_PATH)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per strategy.")
@runtime_options
def optimize(model, prompt_tokens, decode_tokens, runs, opts):
    """Run every prefill and decode strategy, rank them, and store the winner for `serve`."""
    from .optimize import optimize as run_optimize
    from .optimize import tables

    try:
        res = run_optimize(model, opts, prompt_tokens, decode_tokens, runs, log=lambda m: click.echo(m, err=True),
                           prestarted=_prestart(model, opts))
    except (*_user_errors(), RuntimeError) as e:
        _fail(e)
    click.echo(tables(res))


@main.command()
@click.argument("model", type=MODEL_PATH)
@click.option("--text", "text_file", required=True, type=click.File("r"),
              help="Representative text (prompts, code, documents) to prefill; '-' reads stdin.")
@runtime_options
def calibrate(model, text_file, opts):
    """Gather hot-expert (HCS) counts for MODEL from representative text; hcs_prefill and
    hcs_hybrid then start from them."""
    from tqdm import tqdm

    from .calibrate import calibrate as run_calibrate

    text = text_file.read()
    prestarted = _prestart(model, opts)
    try:
        with tqdm(desc="calibrating", unit="tok", disable=None) as bar:
            res = run_calibrate(model, opts, text, bar.update, prestarted=prestarted)
    except (*_user_errors(), ValueError, RuntimeError) as e:
        _fail(e)
    from .calibrate import report_lines

    click.echo(f"calibrate: {res['tokens']} tokens; counts of {res['layers']} MoE layers in {res['counts']}")
    click.echo("\n".join(report_lines(res["routing"])) + f"\n  (saved in {res['routing_path']})")


class _Shapes(click.Choice):
    """click.Choice of coordinator/synth.py's SHAPES, read when used: synth imports torch."""

    def __init__(self):
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:
        from .synth import SHAPES

        return tuple(SHAPES)


@main.command()
@click.option("--shape", required=True, type=_Shapes(),
              help="The real model whose shape to copy.")
@click.option("--layers", type=int, help="Decoder layers (default: the real model's).")
@click.option("--experts", type=int, help="Routed experts per layer (default: the real model's; fewer for tests).")
@click.option("--vocab", type=int, help="Vocabulary size (default: the real model's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--expert-bits", type=click.Choice(["4", "8"]),
              help="Write the routed experts straight into the INT4/INT8 expert cache instead of BF16 shards "
              "(for shapes too large for the disk in BF16); run them with --cpu-bits/--gpu-bits of the same value.")
@click.option("--group-size", type=click.IntRange(min=2), default=128, show_default=True,
              help="Quantization group of --expert-bits (the runs must use the same).")
@click.argument("out", type=click.Path(file_okay=False))
def synth(shape, layers, experts, vocab, seed, expert_bits, group_size, out):
    """Write a random-weight model of a real model's shape in Hugging Face layout (with a tokenizer)."""
    from .synth import SynthError
    from .synth import synth as run_synth

    try:
        path = run_synth(shape, out, layers, experts, vocab, seed,
                         expert_bits=int(expert_bits) if expert_bits else None, group_size=group_size)
    except (SynthError, *_user_errors()) as e:
        _fail(e)
    click.echo(str(path))


@main.command()
@click.option("--listen", required=True, help="This agent's tcp://ADDR:PORT; it also uses PORT+1 (reports) and "
                                              "PORT+2 (activations into its first stage).")
@click.option("--devices", default="cpu", show_default=True,
              help="Comma-separated devices of this machine, one pipeline stage each: cuda:0,cuda:1 or cpu,cpu.")
@click.option("--cpu-workers", type=click.IntRange(min=1), help="CPU expert pool processes (default: one per NUMA node).")
@click.option("--numa-nodes", type=click.IntRange(min=1), help="Simulate this many NUMA nodes (splits the cores).")
@click.option("--keys", type=click.Path(file_okay=False, exists=True), help="CURVE keys folder (krasis-coord keygen DIR).")
@click.option("--insecure", is_flag=True, help="Allow a --listen beyond loopback without --keys (a network you trust).")
@click.option("--model-path", type=click.Path(), help="The model folder on this machine (default: the coordinator's MODEL path).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where this machine keeps its weight caches "
                                                                     "(default: as for serve).")
def host(listen, devices, cpu_workers, numa_nodes, keys, insecure, model_path, cache_dir):
    """Run a host agent: it starts the stages a coordinator (serve/generate/bench --hosts) assigns it."""
    from .host_agent import serve_host

    try:
        require_keys([listen], keys, insecure)
        serve_host(listen, [d.strip() for d in devices.split(",") if d.strip()], cpu_workers, numa_nodes, keys,
                   model_path, cache_dir)
    except (KeysError, ValueError, *_user_errors()) as e:
        _fail(e)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "client", help="Add a client NAME to an existing folder: its keys go to DIRECTORY/clients/NAME "
                                         "(hand that folder to it) and its public key to DIRECTORY/authorized.")
def keygen(directory, client):
    """Write CURVE keys (docs/deployment.md): the cluster's pair, a client's pair, and authorized/."""
    from ..shared.keys import add_client
    from ..shared.keys import keygen as run_keygen

    try:
        if client:
            click.echo(f"keygen: client {client} in {add_client(directory, client)}; restart the service to admit it")
        else:
            run_keygen(directory)
            click.echo(f"keygen: keys in {directory}; copy it to every machine of the service")
    except KeysError as e:
        _fail(e)


def run() -> None:
    """The `krasis-coord` command: main, then the process ends at once (shared/lifecycle.py:
    run_then_exit; the interpreter's finalization took ~0.7 s of every command's exit)."""
    from ..shared.lifecycle import run_then_exit

    run_then_exit(main)
