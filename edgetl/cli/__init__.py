"""The ``edgetl`` command line. Each command parses options, calls the Python API and renders the result.

Exit codes: 0 success, 1 user error (one line, no traceback), 2 usage error, 3 budget missed.

The stage options are generated from :mod:`edgetl.options`. The API modules are imported inside the
commands: they import torch, and ``edgetl --help`` must start in a fraction of a second on any machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import click

from edgetl.cli.params import cli_inputs, cli_options, parse, parse_inputs
from edgetl.device.profiles import threads_for
from edgetl.errors import BudgetExceededError, ConfigError, ConstraintError, EdgetlError, os_error_message
from edgetl.options import (
    KERNEL_SAMPLES,
    MAX_BATCH,
    MODEL_HELP,
    PRECISIONS,
    TABLE_ROWS,
    Constraints,
    ExportOptions,
    FinetuneOptions,
    OutputOptions,
    RemoteOptions,
    SelectOptions,
    SourceOptions,
    TargetOptions,
    TimingOptions,
    ValidateOptions,
    cap_threads,
)

log = logging.getLogger("edgetl")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        console.width = 200
    return console


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout and nothing else (NaN and infinities, which JSON lacks, as null)."""
    click.echo(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


DEBUG_ENV = "EDGETL_DEBUG"

CONNECTION = ("on", "device_python", "accept_new_host_key")
"""The fields of RemoteOptions that say how to reach a board; the commands with a --runtime of their own (bench,
device calibrate), or none (device info), take these."""


VERBOSE_KEY = "edgetl.verbose"
"""Where the root context's ``meta`` counts the ``-v`` flags given before and after the command."""


def _set_verbosity(ctx: click.Context, _param: click.Parameter, count: int) -> int:
    """Add ``count`` to the ``-v`` flags seen so far on the command line and set the log level from the total:
    warnings, then INFO with ``-v``, DEBUG with ``-vv``; a plain line per record on stderr (rich would wrap a
    long path at the terminal's width)."""
    if ctx.resilient_parsing:
        return count
    root = ctx.find_root()
    total = root.meta.get(VERBOSE_KEY, 0) + (count or 0)
    root.meta[VERBOSE_KEY] = total
    level = logging.WARNING if total == 0 else logging.INFO if total == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger().setLevel(level)
    return count


def _add_verbose(command: click.Command) -> None:
    """Give ``command`` the one ``-v``/``--verbose`` (unless it declares its own), so that ``edgetl -v select``
    and ``edgetl select -v`` mean the same."""
    if not any(p.name == "verbose" for p in command.params):
        command.params.append(click.Option(
            ["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbosity,
            help="More log output on stderr (-vv for debug); before or after the command."))


class EdgetlCommand(click.Command):
    """A command of edgetl: it takes ``-v``/``--verbose`` (:func:`_add_verbose`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_verbose(self)


class EdgetlGroup(click.Group):
    """A click group that turns every error into a one-line message and its exit code.

    - :class:`EdgetlError`: its message and its exit code (1, or 3 for a missed budget);
    - Ctrl-C (or SIGTERM): ``interrupted``, exit code 130;
    - any other exception is an edgetl bug or an input it does not handle: one line naming the
      exception, exit code 1, and a pointer to ``-v``. With ``-v`` or ``EDGETL_DEBUG=1`` the exception
      is re-raised instead, so the traceback is printed (and a test harness such as click's
      ``CliRunner`` sees the exception itself: the test suite sets ``EDGETL_DEBUG=1``).

    The group, its subgroups and every command in them take ``-v`` (:func:`_add_verbose`).
    """

    command_class = EdgetlCommand
    group_class = type  # subgroups (weights, device) are EdgetlGroups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_verbose(self)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgetlError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except OSError as exc:  # a full disk, a read-only or forbidden folder: the user's to fix
            message = os_error_message(exc)
            if message is None:
                if _debugging(ctx):
                    raise
                message = unexpected_message(exc)
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)
        except Exception as exc:
            if _debugging(ctx):
                raise
            click.echo(f"error: {unexpected_message(exc)}", err=True)
            ctx.exit(1)


def _debugging(ctx: click.Context) -> bool:
    verbose = ctx.find_root().meta.get(VERBOSE_KEY, 0) or (ctx.params or {}).get("verbose") or 0
    return verbose > 0 or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def unexpected_message(exc: BaseException) -> str:
    """One line for an exception edgetl did not expect: its type, its first line, and where to look next."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return (f"unexpected {text}; run again with -v for the traceback, "
            "and report it if the input looks valid")


@click.group(cls=EdgetlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgetl")
@click.option(
    "--profiles",
    "profiles_dir",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Extra folder of device profile YAML files (also EDGETL_PROFILE_PATH).",
)
def cli(profiles_dir: tuple[str, ...]) -> None:
    """edgetl: pick a backbone for an edge device, fine-tune it, export and validate it.

    \b
    Examples:
      edgetl select --device jetson
      edgetl demo
      edgetl select --device jetson -v    # -v, -vv: more log output, before or after the command
    """
    if profiles_dir:
        extra = os.pathsep.join(profiles_dir)
        current = os.environ.get("EDGETL_PROFILE_PATH")
        os.environ["EDGETL_PROFILE_PATH"] = extra + (os.pathsep + current if current else "")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


@cli.command("models")
@cli_options(SelectOptions, only=("models", "all_weights", "zoo"))
@cli_options(OutputOptions)
def models_cmd(**kwargs) -> None:
    """List the catalog: torchvision's ImageNet-1K weights and timm's edge families (timm/<arch>.<tag>).

    \b
    Examples:
      edgetl models --models 'mobilenet*'
      edgetl models --zoo timm --models 'timm/mobilenetv4_conv_small*'
    """
    from edgetl.zoo.catalog import list_models

    opts, as_json = parse(SelectOptions, kwargs), parse(OutputOptions, kwargs).as_json
    with _progress("building the catalog", CATALOG) as advance:
        cards = list_models(opts.models, default_only=not opts.all_weights, zoo=opts.zoo, progress=advance)
    if as_json:
        emit_json([c.summary() for c in cards])
        return
    from rich.table import Table

    table = Table(title=f"{len(cards)} catalog entries (ImageNet-1K weights, zoo: {opts.zoo})")
    for col in ("model", "weights", "default", "top-1", "top-5", "params (M)", "GFLOPs", "file MB", "res", "head"):
        table.add_column(col, justify="left" if col in ("model", "weights", "head") else "right")
    for c in cards:
        table.add_row(
            c.name, c.weights, "✓" if c.is_default else "", _pct(c.top1), _pct(c.top5),
            f"{c.params / 1e6:.1f}", f"{c.gflops:.2f}", f"{c.file_mb:.1f}", str(c.resolution), c.head_path,
        )
    _stdout_console().print(table)


@cli.command("select")
@cli_inputs("select")
@cli_options(SelectOptions)
@cli_options(Constraints)
@cli_options(OutputOptions)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every ranked row as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the Pareto bubble chart (PNG).")
@click.option("--measure", "measure_n", type=click.IntRange(min=1), default=None, is_flag=False, flag_value=5,
              help="Also time the top N (default 5) for real on this machine with ONNX Runtime (see --threads).")
def select_cmd(csv_path, plot_path, measure_n, **kwargs) -> None:
    """Rank pretrained backbones for a device by predicted latency, memory, size and top-1.

    Without --max-latency-ms the ranking keeps to one frame per image at the device's real-time rate (33.3 ms at
    30 fps), and the title says so; --max-latency-ms none ranks without a latency budget.

    \b
    Examples:
      edgetl select --device jetson --max-latency-ms none --top 5
      edgetl select --device raspberry-pi-5 --precision int8 --max-latency-ms 30 --models 'mobilenet*' --plot pareto.png
      edgetl select --device jetson --max-latency-ms 5 --precision fp16 --models 'resnet[0-9]*' --json > ranking.json
    """
    inputs, as_json = parse_inputs("select", kwargs), parse(OutputOptions, kwargs).as_json
    options, constraints = parse(SelectOptions, kwargs), parse(Constraints, kwargs)
    from edgetl.select import select
    with _progress("tracing", TRACING) as advance:
        ranking = select(options=options, constraints=constraints, progress=advance, **inputs)
    for model_id, reason in ranking.skipped:
        click.echo(f"warning: could not predict {model_id}: {reason}", err=True)
    if plot_path:
        ranking.plot(plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if csv_path:
        ranking.to_csv(csv_path)
        click.echo(f"wrote {csv_path}", err=True)
    if not ranking.rows:
        raise ConstraintError(ranking.no_fit_message())
    measured_note = None
    if measure_n:
        measured_note = _measure_ranking(ranking, measure_n, ranking.target.threads, quiet=as_json)
    if as_json:
        doc = ranking.to_document(LIFT)
        if measure_n:
            for row, r in zip(doc["rows"], ranking.rows, strict=True):
                row["measured_ms"] = None if r.measured_ms is None else round(r.measured_ms, 4)
        emit_json(doc)
        return
    _print_ranking(ranking, measured=bool(measure_n))
    if measured_note:
        _stdout_console().print(measured_note)


def _measure_ranking(ranking, n: int, threads: int | None, quiet: bool) -> str:
    """Time the top ``n`` rows on this machine and attach ``measured_ms``; return a note for the user."""
    from edgetl.calibrate.measure import measure_models

    rows = ranking.rows[:n]
    p = ranking.profile
    threads = cap_threads(threads_for(p, threads))
    with _progress("exporting for measurement") as advance:
        results = measure_models(
            [r.card.id for r in rows], resolution=None, batch=ranking.batch, threads=threads, progress=advance
        )
    for r in rows:
        r.measured_ms = results[r.card.id].min_ms
    runs = results[rows[0].card.id].runs
    notes = [f"measured here with ONNX Runtime CPU fp32 (each alone, warmed up, minimum of {runs} consecutive runs)"]
    if not p.is_this_machine():
        notes.append(
            f"'{p.name}' is not this machine: the measurement is of this machine, the prediction of {p.name}; "
            "run `edgetl device calibrate` for a profile of this machine"
        )
    elif ranking.precision != "fp32":
        notes.append(f"the prediction is at {ranking.precision}, the measurement at fp32")
    return "note: " + "; ".join(notes)


def _print_ranking(ranking, measured: bool = False) -> None:
    from rich.table import Table

    p = ranking.profile
    title = (
        f"{p.name} · {ranking.precision} · batch {ranking.batch} · predicted "
        f"{'kernel by kernel from timings calibrated on the device' if p.kernels else 'by the roofline model'}"
        f" · constraints: {ranking.describe_constraints(LIFT)}"
    )
    table = Table(title=title)
    cols = ["#", "model", "weights", "top-1", "params (M)", "GFLOPs", f"size MB ({ranking.precision})",
            "latency ms", "FPS", "memory MB", "Pareto", "fits"]
    if measured:
        cols[8:8] = ["measured ms (here)", "pred/meas"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "weights") else "right")
    for i, r in enumerate(ranking.rows[: ranking.top or TABLE_ROWS], 1):
        d = r.to_dict()
        cells = [
            str(i), d["model"], d["weights"], f"{d['top1']:.2f}", f"{d['params_m']:.1f}", f"{d['gflops']:.2f}",
            f"{d['size_mb']:.1f}", f"{d['latency_ms']:.2f}", f"{d['fps']:.0f}", f"{d['memory_mb']:.0f}",
            "★" if d["pareto"] else "", "✓" if d["fits"] else "✗",
        ]
        if measured:
            m = r.measured_ms
            cells[8:8] = ["" if m is None else f"{m:.2f}", "" if m is None else f"{r.latency_ms / m:.2f}"]
        table.add_row(*cells)
    console = _stdout_console()
    console.print(table)
    n_fit = sum(1 for r in ranking.candidates if r.fits)
    budget = ranking.budget
    within = f" · the default latency budget of {budget.ms:g} ms ({budget.basis}) chose it; {LIFT}" \
        if budget.origin == "default" else ""
    console.print(
        f"best: [bold]{ranking.best.card.id}[/bold] · {n_fit} of {len(ranking.candidates)} entries fit{within}",
        highlight=False,
    )
    left_out = ranking.left_out
    if left_out:
        listed = "; ".join(f"{model} ({why})" for model, why in left_out)
        console.print(f"{len(left_out)} {'entry' if len(left_out) == 1 else 'entries'} left out: {listed}",
                      highlight=False, markup=False)


CATALOG = "first run: building the model catalog, once (cached; later runs take a second)"
"""The line ``edgetl models`` writes on a stderr that is not a terminal when it builds the catalog."""

TRACING = "first run: tracing the catalog's models on the meta device, once (cached; later runs take a second)"
"""The line select writes on a stderr that is not a terminal when it builds the catalog or traces models."""

LIFT = "--max-latency-ms none lifts it"
"""How the command line lifts select's default latency budget."""


class _progress:
    """Progress on stderr while there is real work (a cold cache: the API reports only that): a rich progress bar
    on a terminal (after half a second, so that a short job does not flash one), else one line at the start.

    The callback takes ``(done, total, name)``; a new ``total`` starts a new phase (the catalog, then the traces).
    ``label`` heads the bar, ``note`` (default: ``label``) is the line.
    """

    def __init__(self, label: str, note: str | None = None) -> None:
        self.label = label
        self.note = note or label
        self.bar = None
        self.task = None

    def __enter__(self):
        import time

        start = time.monotonic()
        console = _stderr_console()
        noted = False

        def advance(done: int, total: int, name: str) -> None:
            nonlocal noted
            if done >= total and self.bar is None:
                return
            if not console.is_terminal:
                if not noted:
                    click.echo(f"{self.note} ...", err=True)
                    noted = True
                return
            if self.bar is None and time.monotonic() - start > 0.5:
                from rich.progress import Progress

                self.bar = Progress(console=console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task(self.label, total=total)
            if self.bar is not None:
                self.bar.update(self.task, total=total, completed=done, description=f"{self.label} {name}")

        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _peak(profile, precision: str) -> str:
    fig = profile.compute.get(precision)
    return "—" if fig is None else f"{fig.value:,.0f}"


def _profile_file(profile) -> str:
    from edgetl.device.profiles import builtin_profile_dir

    path = profile.path
    if path is None:
        return ""
    return f"built-in/{path.name}" if path.parent == builtin_profile_dir() else str(path)


@cli.command("devices")
@cli_options(OutputOptions)
def devices_cmd(**kwargs) -> None:
    """List the device profiles (built-in, user folder, EDGETL_PROFILE_PATH / --profiles).

    \b
    Examples:
      edgetl devices
      edgetl --profiles my-profiles devices --json
    """
    from edgetl.device.profiles import list_profiles, profile_search_path

    as_json = parse(OutputOptions, kwargs).as_json
    profiles = list_profiles()
    if as_json:
        emit_json([p.model_dump(mode="json") for p in profiles])
        return
    from rich.table import Table

    table = Table(
        title=f"{len(profiles)} device profiles",
        caption="peaks are dense GFLOP/s (GOP/s for int8); search path, later wins: "
        + ", ".join(str(p) for p in profile_search_path()),
    )
    for col in ("name", "aliases", "family", "runtime", "precisions", *PRECISIONS,
                "RAM GB", "BW GB/s", "refs", "file"):
        right = col in (*PRECISIONS, "RAM GB", "BW GB/s", "refs")
        table.add_column(col, justify="right" if right else "left", overflow="fold")
    for p in profiles:
        table.add_row(
            p.name, ", ".join(p.aliases), p.family, p.runtime, ", ".join(p.precisions),
            *(_peak(p, precision) for precision in PRECISIONS),
            f"{p.memory.ram_mb.value / 1024:g}", f"{p.memory.bandwidth_gbs.value:g}",
            str(len(p.reference)), _profile_file(p),
        )
    _stdout_console().print(table)


UNLESS_RESUMING = "  [required unless --resume]"
"""Help text of an option finetune needs unless it continues a run (which knows it): click's ``required`` would
refuse ``--resume`` alone, so the API checks it (exit 1, one line) and the help says so."""


@cli.command("finetune")
@click.option("--model", "-m", default=None, help=MODEL_HELP + UNLESS_RESUMING)
@click.option("--data", default=None, type=click.Path(exists=True),
              help="Folder of class folders, a folder with train/ and val/, or a CSV of path,label."
                   + UNLESS_RESUMING)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--restart", is_flag=True,
              help="Delete the edgetl run in --out and start over (for a run --resume cannot continue).")
@cli_inputs("finetune")
@cli_options(FinetuneOptions)
@cli_options(OutputOptions)
def finetune_cmd(model, data, out, resume, restart, **kwargs) -> None:
    """Fine-tune a backbone on your images and write RUN_DIR (weights, metrics, plots).

    \b
    Examples:
      edgetl finetune --model mobilenet_v3_small --data edgetl-demo/data --out runs/scratch --weights none --epochs 1
      edgetl finetune --model timm/tf_efficientnet_lite0 --data my-images/ --out runs/lp-ft --strategy lp-ft
      edgetl finetune --out runs/lite0 --resume
    """
    inputs, as_json = parse_inputs("finetune", kwargs), parse(OutputOptions, kwargs).as_json
    options = parse(FinetuneOptions, kwargs)
    from edgetl.finetune.api import finetune
    err = _stderr_console()

    def show_decision(decision) -> None:
        err.print(f"[bold]strategy:[/bold] {decision.strategy} — {decision.reason}")
        if decision.trials is not None and decision.trials.ran:
            from rich.table import Table

            trials = Table(title=f"auto's trials (scored on validation; {decision.trials.reason})")
            for column in ("strategy", "epochs tried", "val top-1", "val loss", "chosen"):
                trials.add_column(column)
            for row in decision.trials.rows():
                trials.add_row(*row)
            err.print(trials)

    result = finetune(model, data, out, options, resume=resume, restart=restart, progress=True,
                      on_decision=show_decision, **inputs)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    if as_json:
        emit_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"finetune {result.model} (weights: {result.weights})", show_header=False)
    table.add_row("strategy", f"{result.strategy.strategy}: {result.strategy.reason}")
    for label, value in (("val accuracy", result.val_accuracy), ("test accuracy", result.test_accuracy)):
        table.add_row(label, "—" if value is None else f"{100 * value:.1f}%")
    early = " (early stop)" if result.stopped_early else ""
    best = "0 (the linear probe: no fine-tuning epoch beat it)" if result.best_epoch == 0 else result.best_epoch
    table.add_row("best epoch", f"{best} of {result.epochs_run}{early}")
    table.add_row("feature cache", "yes" if result.feature_cache else "no")
    table.add_row("skipped images", str(len(result.skipped)))
    table.add_row("run dir", str(result.run_dir))
    table.add_row("time", f"{result.seconds:.1f} s")
    _stdout_console().print(table)
    for path, reason in result.skipped[:10]:
        err.print(f"skipped {path}: {reason}")


@cli.group("weights")
def weights_group() -> None:
    """Pretrained weights for offline (air-gapped) machines.

    \b
    Examples:
      edgetl weights pull mobilenet_v3_small --dir weights/
      edgetl weights import lite0.pth --model timm/tf_efficientnet_lite0 --dir weights/
    """


@weights_group.command("pull")
@click.argument("model")
@click.option("--dir", "dest", type=click.Path(file_okay=False), default=None,
              help="Destination folder [default: $EDGETL_WEIGHTS_DIR or ~/.cache/torch/hub/checkpoints].")
@cli_options(OutputOptions)
def weights_pull_cmd(model: str, dest: str | None, **kwargs) -> None:
    """Download MODEL's ImageNet weights (hash-checked) to copy to an offline machine.

    \b
    Example:
      edgetl weights pull mobilenet_v3_small --dir weights/
    """
    from edgetl.zoo.weights import pull_weights

    as_json = parse(OutputOptions, kwargs).as_json
    path = pull_weights(model, dest, progress=not as_json)
    if as_json:
        emit_json({"model": model, "file": str(path)})
    else:
        click.echo(f"{path}\ncopy it into ~/.cache/torch/hub/checkpoints or $EDGETL_WEIGHTS_DIR on the offline machine")


@weights_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "-m", required=True,
              help="Catalog model whose architecture FILE holds, e.g. timm/tf_efficientnet_lite0.")
@click.option("--dir", "dest", type=click.Path(file_okay=False), default=None,
              help="Weights folder to write into, never torch hub's or Hugging Face's cache "
                   "[default: $EDGETL_WEIGHTS_DIR or ~/.cache/edgetl/weights].")
@click.option("--force", is_flag=True, help="Replace the weights file if the folder already holds one.")
@cli_options(OutputOptions)
def weights_import_cmd(file: str, model: str, dest: str | None, force: bool, **kwargs) -> None:
    """Map a foreign state_dict FILE onto MODEL by order and shape, verify it, save it where edgetl finds it.

    FILE is read with weights_only=True: a pickle that carries code is refused, never run. The default folder
    is one that finetune, export and predict look in; with --dir, pass the same folder as --weights-dir (or
    $EDGETL_WEIGHTS_DIR) to use the weights offline. An existing file is replaced only with --force.

    Verified means: every tensor finite (no NaN or inf); tensors paired in order, each pair of the same shape; no
    BatchNorm running variance negative (zeros are real: dead channels); and, for a model with a known answer
    (timm/tf_efficientnet_lite0 on scikit-image's cat and coffee photos), the imported network gives that answer.
    Otherwise nothing is written.

    \b
    Example:
      edgetl weights import lite0.pth --model timm/tf_efficientnet_lite0 --dir weights/
    """
    from edgetl.zoo.weights_import import import_weights_report

    as_json = parse(OutputOptions, kwargs).as_json
    report = import_weights_report(file, model, dest, force=force)
    if as_json:
        emit_json({"model": report.model, "file": str(report.path), "verified": list(report.checks)})
    else:
        click.echo(str(report.path))
        click.echo("verified: " + "; ".join(report.checks), err=True)


@cli.command("predict")
@click.argument("source", metavar="SOURCE")
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to show per image.")
@click.option("--check", is_flag=True, default=False,
              help="First re-run an artifact's golden inputs on this runtime; a divergence from export's outputs "
                   "(or a preprocess.json that differs from export's) exits 1.")
@cli_inputs("predict")
@cli_options(ValidateOptions, only=("verify_key",))
@cli_options(OutputOptions)
def predict_cmd(source, images, top, check, **kwargs) -> None:
    """Classify IMAGE... with SOURCE: an artifact folder (run as firmware would), a run folder or a catalog name.

    \b
    Examples:
      edgetl predict artifacts/lite0 edgetl-demo/data/test/dots/dots_0000.png --top 2
      edgetl predict runs/lite0 edgetl-demo/data/test/dots/dots_0000.png --json > predictions.json
    """
    from edgetl.predict import predict

    inputs, as_json = parse_inputs("predict", kwargs), parse(OutputOptions, kwargs).as_json
    verify_key = parse(ValidateOptions, kwargs).verify_key
    predictions = predict(source, images, top=top, **inputs, verify_key=verify_key, check=check)
    if as_json:
        emit_json([p.to_dict() for p in predictions])
        return
    console = _stdout_console()
    for p in predictions:
        ranked = ", ".join(f"{label} {100 * prob:.1f}%" for label, prob in zip(p.labels, p.probabilities,
                                                                              strict=True))
        console.print(f"{p.image}: [bold]{p.label}[/bold] ({ranked})", highlight=False)


@cli.command("bench")
@click.argument("target", metavar="MODEL|FILE.onnx")
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True)
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=None,
              help="Images per inference [default: 1, or the file's fixed batch].")
@cli_options(SourceOptions, only=("resolution",))
@cli_options(TimingOptions)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="TensorRT engine precision (tensorrt runtime only; int8 needs a QDQ model).")
@cli_options(RemoteOptions, only=CONNECTION)
@cli_options(OutputOptions)
def bench_cmd(target, runtime, batch, precision, **kwargs) -> None:
    """Time a catalog model (exported with random weights) or an ONNX file on this machine, or on a board (--on).

    Reports latency percentiles, throughput, peak memory and the coefficient of variation; a CV
    above 10% means the machine was busy and the figures are noisy (trust min then). With --on, a catalog
    model is exported here and its ONNX file timed on the board with ONNX Runtime, or, with --runtime tensorrt
    (a Jetson), with a --precision engine that the board builds from it.

    \b
    Examples:
      edgetl bench mobilenet_v3_small --resolution 96 --iterations 50
      edgetl bench artifacts/lite0/model.onnx --threads 2 --json
      edgetl bench artifacts/lite0/model.onnx --on ssh://pi@raspberrypi.local
      edgetl bench artifacts/lite0/model.onnx --runtime tensorrt --on ssh://jetson.local
    """
    from edgetl.runtime import make_runner
    from edgetl.runtime.bench import benchmark

    timing, resolution = parse(TimingOptions, kwargs), parse(SourceOptions, kwargs).resolution
    remote, as_json = parse(RemoteOptions, kwargs), parse(OutputOptions, kwargs).as_json
    err = _stderr_console()
    if remote.on and runtime == "torch":
        raise ConfigError("--on times ONNX files on the board, with onnxruntime or tensorrt; drop --runtime torch")
    path, shape, info = _bench_target(target, runtime, batch, resolution, err)
    info["threads"] = timing.threads
    if runtime == "tensorrt" and timing.threads is not None:
        err.print("[yellow]--threads has no effect with --runtime tensorrt[/]")
    if remote.on:
        _bench_on_board(remote, path, shape, info, timing, as_json, precision)
        return
    info["threads"] = cap_threads(timing.threads)
    options: dict[str, Any] = {"threads": info["threads"]}
    if runtime == "tensorrt":
        options = {"precision": precision, "max_batch": max(8, shape[0])}
    runner = make_runner(runtime, path, name=info["model"], **options)
    with err.status(f"timing {info['model']} on {runtime}: {timing.warmup} warm-up + {timing.iterations} runs"):
        result = benchmark(runner, shape=shape, iterations=timing.iterations, warmup=timing.warmup)
    if as_json:
        emit_json({**info, **result.to_dict()})
        return
    _print_bench(info, result)


def _bench_on_board(remote: RemoteOptions, path: Any, shape: tuple[int, ...], info: dict[str, Any],
                    timing: TimingOptions, as_json: bool, precision: str) -> None:
    """Time the ONNX file on the board, with its runtime (``info["runtime"]``: an engine of ``precision`` built
    there, for tensorrt)."""
    import dataclasses

    from edgetl.board.jobs import Remote, bench_on_board

    runtime = info["runtime"]
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"--on sends an ONNX file to the board, not {path.name}: an engine only runs on the GPU and "
                          "TensorRT version that built it, so with --runtime tensorrt the board builds its own")
    on_board = dataclasses.replace(Remote.of(remote), runtime=runtime)
    with _stderr_console().status(f"timing {info['model']} on {remote.on} with {runtime}"
                                  + (" (building the engine first: minutes)" if runtime == "tensorrt" else "")
                                  + f": {timing.warmup} warm-up + {timing.iterations} runs"):
        result, board = bench_on_board(on_board, path, shape, timing.iterations, timing.warmup, timing.threads,
                                       precision)
    info.update(board=board, **({"precision": precision} if runtime == "tensorrt" else {}))
    if as_json:
        emit_json({**info, **result.to_dict()})
        return
    _print_bench({**info, "runtime": f"{runtime} on {remote.on}"}, result)
    _stdout_console().print(f"board: {_board_line(board)}", highlight=False)


def _board_line(board: dict[str, Any]) -> str:
    """One line about a board: CPU, cores, memory, OS, Python, runtime, GPU, nearest profile."""
    cpu, packages = board["cpu"], board.get("packages") or {}
    gpu = board.get("gpu")
    return (f"{board.get('board') or cpu['model']} ({board['arch']}, {cpu['cores']} cores, "
            f"{cpu['ram_mb'] / 1024:.1f} GB, ISA {' '.join(cpu['isa']) or 'none listed'}); {board['os']}; Python "
            f"{board['python']}; onnxruntime {packages.get('onnxruntime') or packages.get('onnxruntime-gpu')}"
            + (f"; tensorrt {packages['tensorrt']}" if packages.get("tensorrt") else "")
            + (f"; GPU {gpu}" if gpu else "")
            + f"; nearest profile: {board.get('nearest_profile')} ({board.get('nearest_profile_why')})")


def _bench_target(target: str, runtime: str, batch: int | None, resolution: int | None,
                  err: Any) -> tuple[Any, tuple[int, int, int, int], dict[str, Any]]:
    """What to time (a file, or a catalog model exported or built here), its input shape, and a description."""
    from pathlib import Path

    from edgetl.runtime.bench import onnx_input_shape

    info: dict[str, Any] = {"model": target, "runtime": runtime}
    path = Path(target)
    if target.lower().endswith((".onnx", ".engine", ".plan", ".trt")) or path.is_file():
        if runtime == "torch":
            raise ConfigError(f"--runtime torch runs catalog models in PyTorch, not files; time {path.name} with "
                              "--runtime onnxruntime or tensorrt")
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        if path.suffix.lower() != ".onnx" and resolution is None:
            raise ConfigError(f"pass --resolution to time the engine {path.name}")
        shape = onnx_input_shape(path, batch, resolution) if path.suffix.lower() == ".onnx" \
            else (batch or 1, 3, resolution, resolution)
        info.update(model=path.name, source="file", file=str(path))
        return path, shape, info
    return _catalog_bench_target(target, runtime, batch, resolution, err, info)


def _catalog_bench_target(target: str, runtime: str, batch: int | None, resolution: int | None, err: Any,
                          info: dict[str, Any]) -> tuple[Any, tuple[int, int, int, int], dict[str, Any]]:
    from edgetl.zoo.catalog import deployed_model, get_card
    from edgetl.zoo.onnx_cache import cached_catalog_onnx
    from edgetl.zoo.weights import load_model

    card = get_card(target)
    res = resolution or card.resolution
    info.update(model=card.name, source="catalog", weights="none (random init)")
    shape = (batch or 1, 3, res, res)
    if runtime == "torch":
        return deployed_model(load_model(card, weights=None, resolution=res).model, card), shape, info
    with err.status(f"exporting {card.name} at {res}px to ONNX"):
        report = cached_catalog_onnx(card.id, resolution=res)
    info["onnx"] = {"nodes_exported": report.nodes_exported, "nodes": report.nodes,
                    "opset": report.opset, "exporter": report.exporter}
    return report.path, shape, info


def _print_bench(info: dict[str, Any], result) -> None:
    from rich.table import Table

    table = Table(title=f"{info['model']} on {info['runtime']}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("input", "x".join(str(d) for d in result.shape))
    table.add_row("threads", "all" if info.get("threads") is None else str(info["threads"]))
    if "onnx" in info:
        onnx_info = info["onnx"]
        table.add_row("onnx nodes", f"{onnx_info['nodes']} (exported {onnx_info['nodes_exported']})")
    table.add_row("iterations", f"{result.iterations} (+{result.warmup} warm-up)")
    for key in ("p50", "p90", "p99", "mean", "min", "max"):
        table.add_row(f"{key} ms", f"{getattr(result, key):.3f}")
    cv_style = "red" if result.unstable else "green"
    table.add_row("CV", f"[{cv_style}]{100 * result.cv:.1f}%[/]")
    table.add_row("throughput", f"{result.throughput:.1f} img/s")
    table.add_row("peak RSS", f"{result.peak_rss_mb:.0f} MB")
    _stdout_console().print(table)


@cli.group("device")
def device_group() -> None:
    """Device profiles of this machine, and boards reached over SSH (--on).

    \b
    Example:
      edgetl device calibrate --name my-box && edgetl select --device my-box --measure 3
    """


@device_group.command("info")
@cli_options(RemoteOptions, only=CONNECTION)
@cli_options(OutputOptions)
def device_info_cmd(**kwargs) -> None:
    """Print a machine's fingerprint (CPU model and flags, cores, memory, OS, Python, runtime versions, GPU) and
    the nearest built-in profile: this machine's, or a board's with --on.

    \b
    Examples:
      edgetl device info
      edgetl device info --on ssh://pi@raspberrypi.local --json
    """
    from edgetl.board.jobs import Remote, board_info, describe

    remote, as_json = parse(RemoteOptions, kwargs), parse(OutputOptions, kwargs).as_json
    if remote.on:
        with _stderr_console().status(f"asking {remote.on}"):
            info = board_info(Remote.of(remote))
    else:
        from edgetl.device.machine import machine_info

        info = describe("this machine", machine_info())
    if as_json:
        emit_json(info)
        return
    _stdout_console().print(f"{info['address']}: {_board_line(info)}", highlight=False)


@device_group.command("calibrate")
@click.option("--name", default="local", show_default=True, help="Profile name (then usable as --device NAME).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="YAML file to write [default: the user profile folder, where --device finds it].")
@cli_options(TargetOptions, only=("threads",))
@click.option("--rounds", type=click.IntRange(min=1), default=25, show_default=True, help="Timed runs per model.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
              help="What to time: ONNX Runtime on the CPU, or FP16 TensorRT engines on a Jetson "
                   "[default: tensorrt on a Jetson that has it].")
@click.option("--kernel-samples", type=click.IntRange(min=0), default=KERNEL_SAMPLES, show_default=True,
              help="Micro-graphs of the catalog's distinct kernels to time; latency is then predicted kernel by "
                   "kernel (0: the fitted roofline only).")
@cli_options(RemoteOptions, only=CONNECTION)
@cli_options(OutputOptions)
def device_calibrate_cmd(name: str, out: str | None, rounds: int, runtime: str | None, kernel_samples: int,
                         **kwargs) -> None:
    """Measure this machine, or a board over SSH (--on), and write a device profile fitted to it.

    With --on, the models and the kernels' micro-graphs are built here, timed on the board (kept there in
    ~/.cache/edgetl/board-models, by content hash, so the next calibration sends none again) and fitted here.

    \b
    Examples:
      edgetl device calibrate --name my-box
      edgetl device calibrate --name my-box --threads 2 --out my-box.yaml
      edgetl device calibrate --name my-pi --on ssh://pi@raspberrypi.local
    """
    from edgetl.calibrate.api import calibrate

    threads, as_json = parse(TargetOptions, kwargs).threads, parse(OutputOptions, kwargs).as_json
    remote = parse(RemoteOptions, kwargs)
    with _progress("calibrating") as advance:
        if remote.on:
            result = _calibrate_on_board(remote, name, out, threads, rounds, runtime, kernel_samples, advance)
        else:
            result = calibrate(name=name, out=out, threads=cap_threads(threads), rounds=rounds, progress=advance,
                               runtime=runtime, kernel_samples=kernel_samples)
    summary = {
        "profile": result.profile.name,
        "path": str(result.path),
        "seconds": round(result.seconds, 1),
        "models": {
            m: {"measured_ms": round(meas.min_ms, 3), "cv": round(meas.cv, 3), "fit_ratio": round(result.ratios[m], 3)}
            for m, meas in result.measurements.items()
        },
        "memory": {
            m: {"measured_mb": round(mb, 1), "fit_ratio": round(result.memory_ratios[m], 3)}
            for m, mb in result.memory_mb.items() if m in result.memory_ratios
        },
        "noise": result.noise.to_dict() if result.noise else None,
    }
    if as_json:
        emit_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"calibration of {result.profile.calibrated['cpu']} ({result.seconds:.0f} s)")
    for col in ("model", "measured ms (min)", "CV", "fitted / measured"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m, d in summary["models"].items():
        table.add_row(m, f"{d['measured_ms']:.2f}", f"{d['cv']:.2f}", f"{d['fit_ratio']:.2f}")
    console = _stdout_console()
    console.print(table)
    if summary["memory"]:
        console.print("session peak RSS, measured MB (fitted / measured): " + ", ".join(
            f"{m} {d['measured_mb']:.0f} ({d['fit_ratio']:.2f})" for m, d in summary["memory"].items()))
    console.print(f"wrote {result.path}; use it with --device {result.profile.name}")


def _calibrate_on_board(remote: RemoteOptions, name: str, out: str | None, threads: int | None, rounds: int,
                        runtime: str | None, kernel_samples: int, advance: Any) -> Any:
    from edgetl.board.calibrate import calibrate_on_board
    from edgetl.board.jobs import Remote

    if runtime not in (None, "onnxruntime"):
        raise ConfigError(f"--on calibrates ONNX Runtime on the board's CPU; drop --runtime {runtime}")
    result, sent = calibrate_on_board(Remote.of(remote), name, out, threads=threads, rounds=rounds,
                                      kernel_samples=kernel_samples, progress=advance)
    log.info("sent %d files (%.0f MB) to %s (the others were in its cache); %.0f s of the jobs' %.0f s were spent "
             "beyond measuring", sent.files, sent.megabytes, remote.on, sent.overhead_s, sent.jobs_s)
    return result


@cli.command("export")
@click.argument("source", metavar="RUN_DIR|MODEL")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Class folders to measure accuracy on [default: the run's validation split].")
@cli_inputs("export")
@cli_options(ExportOptions)
@click.option("--force", is_flag=True, help="Replace an existing --out folder (swapped atomically).")
@cli_options(OutputOptions)
def export_cmd(source, out, data, force, **kwargs) -> None:
    """Export RUN_DIR (or a catalog MODEL with --weights) to an artifact folder: ONNX, INT8/FP16, manifest.

    \b
    Examples:
      edgetl export runs/lite0 --out artifacts/lite0 --device raspberry-pi-5 --precision auto --c-header
      edgetl export runs/lite0 --out artifacts/signed --precision fp32 --sign-key signing.pem
    """
    inputs = parse_inputs("export", kwargs)
    options, as_json = parse(ExportOptions, kwargs), parse(OutputOptions, kwargs).as_json
    from edgetl.export.api import export
    with _stderr_console().status("exporting") as status:
        artifact = export(source, out, options, **inputs, data=data, force=force, check=False,
                          progress=lambda msg: status.update(msg))
    if as_json:
        emit_json(artifact.to_dict())
    else:
        _print_artifact(artifact)
    if artifact.failures:
        raise BudgetExceededError(f"{'; '.join(artifact.failures)}; the artifact is in {artifact.path} for inspection")


def _ms(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _print_artifact(artifact) -> None:
    from rich.table import Table

    m = artifact.manifest
    table = Table(title=f"{artifact.path} · {m['source']['model_name']} · device {m['device']['name']}")
    for col in ("precision", "mode", "size MB", "min ms", "p50 ms", "predicted ms", "top-1", "agreement",
                "drop pts", "shipped", "why"):
        table.add_column(col, justify="left" if col in ("precision", "mode", "why") else "right")
    for c in artifact.candidates:
        lat, acc = c.get("latency") or {}, c.get("accuracy") or {}
        agree = acc.get("top1_agreement", (c.get("parity") or {}).get("top1_agreement"))
        table.add_row(
            c["precision"], c["mode"], f"{(c['file_bytes'] or 0) / 1e6:.2f}", _ms(lat.get("min_ms")),
            _ms(lat.get("p50_ms")), _ms(c.get("predicted_ms")),
            "—" if acc.get("top1") is None else f"{acc['top1']:.2f}",
            "—" if agree is None else f"{100 * agree:.1f}%",
            "—" if acc.get("drop_pts") is None else f"{acc['drop_pts']:.2f}",
            "✓" if c["chosen"] else "", c.get("rejected") or c.get("note") or "",
        )
    console = _stdout_console()
    console.print(table)
    onnx_info, acc, lat = m["onnx"], artifact.accuracy, artifact.latency
    console.print(
        f"ONNX opset {onnx_info['opset']}, {onnx_info['nodes_before_simplify']} -> "
        f"{onnx_info['nodes_after_simplify']} nodes after onnxslim; fp32 parity max |diff| "
        f"{m['candidates'][0]['parity']['max_abs_diff']:.2g}"
    )
    if acc.get("measured"):
        console.print(f"accuracy ({acc['images']} images): fp32 {acc['fp32_top1']:.2f}% -> {artifact.precision} "
                      f"{acc['top1']:.2f}% (drop {acc['drop_pts']:.2f} pts, budget {acc['max_drop_pts']:g})")
    else:
        console.print(f"accuracy: not measured ({acc['reason']})")
    if acc.get("test"):
        console.print(_test_line(acc["test"]))
    console.print(f"ranked on: {m['selection']['ranked_on']}")
    if lat.get("note"):
        console.print(f"note: {lat['note']}")
    if m.get("tensorrt"):
        t = m["tensorrt"]
        console.print(f"TensorRT {t['tensorrt_version']} {t['precision']} engine for {t['gpu']} "
                      f"(compute capability {t['compute_capability']})")
    from edgetl.export.signing import describe

    console.print(f"integrity: {describe(m, verified=None)}")
    state = "[green]passed[/]" if artifact.passed else "[red]FAILED[/]: " + "; ".join(artifact.failures)
    console.print(f"shipped [bold]{artifact.precision}[/] · files: {', '.join(artifact.files)} · {state}")


def _test_line(t: dict) -> str:
    """One line for export's report on the test split."""
    ci, worst = t["artifact"]["top1_ci95"], t["worst_class"] or {}
    return (f"test split (chose nothing, {t['images']} images): fp32 {t['fp32']['top1']:.2f}% -> "
            f"{t['precision']} {t['artifact']['top1']:.2f}% (95% CI {ci['low']:.1f}-{ci['high']:.1f}), "
            f"drop {t['drop_pts']:.2f} pts; worst class {worst.get('name')} {worst.get('drop_pts', 0):.2f} pts")


@cli.command("validate")
@click.argument("artifact", metavar="ARTIFACT_DIR", type=click.Path(file_okay=False))
@cli_inputs("validate")
@cli_options(ValidateOptions)
@cli_options(OutputOptions)
def validate_cmd(artifact, **kwargs) -> None:
    """Verify ARTIFACT_DIR's hashes, measure latency (and accuracy with --data, or --run RUN --split test)
    against the budgets.

    \b
    Examples:
      edgetl validate artifacts/lite0 --device raspberry-pi-5 --data edgetl-demo/data/test --max-latency-ms 500
      edgetl validate artifacts/signed --verify-key signing.pub
    """
    inputs, as_json = parse_inputs("validate", kwargs), parse(OutputOptions, kwargs).as_json
    options = parse(ValidateOptions, kwargs)
    from edgetl.validate import validate
    with _stderr_console().status(f"validating {artifact}"):
        report = validate(artifact, options=options, check=False, **inputs)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_validation(report)
    report.raise_for_budget()


def _print_validation(report) -> None:
    from rich.table import Table

    lat, mem = report.latency, report.memory
    table = Table(title=f"validate {report.artifact} · {report.device} · {report.precision}", show_header=False)
    table.add_column("check", style="bold")
    table.add_column("value")
    table.add_row("files", f"{len(report.files)} files, sha256 ok; {report.integrity.get('summary')}")
    from edgetl.export.golden import summary as golden_summary

    table.add_row("golden outputs", golden_summary(report.golden))
    where = f"on {report.board['address']}" if report.board else "here"
    table.add_row(f"runtime {where}", f"{lat['runtime']} (threads: {lat['threads'] or 'all'})")
    shown = " · ".join(f"{k} {lat[f'{k}_ms']:.3f}" for k in ("p50", "p90", "p99", "min") if f"{k}_ms" in lat)
    table.add_row("latency ms", f"{shown} (CV {100 * lat['cv']:.0f}%, {lat['runs']} runs)")
    if lat.get("predicted_ms") is not None:
        table.add_row(f"predicted on {lat['predicted_for']}", f"{lat['predicted_ms']:.3f} ms")
    if lat["budget_ms"] is not None:
        verdict = "[green]pass[/]" if lat["pass"] else "[red]FAIL[/]"
        table.add_row("latency budget",
                      f"{lat['judged_ms']:.4g} ms ({lat['judged_on']}) vs {lat['budget_ms']:g} ms: {verdict}")
    if mem["runtime_mb"] is not None:
        verdict = "[green]pass[/]" if mem["pass"] else "[red]FAIL[/]"
        table.add_row("memory", f"{mem['runtime_mb']:.1f} MB ({mem.get('measured')}) vs budget "
                                f"{mem['budget_mb']:g} MB: {verdict}")
    if report.accuracy:
        acc = report.accuracy
        ci = acc.get("top1_ci95") or {}
        table.add_row("accuracy", f"top-1 {acc['top1']:.2f}% on {acc['images']} images ({acc['data']}), 95% CI "
                                  f"{ci.get('low', 0):.1f}-{ci.get('high', 100):.1f}%")
    table.add_row("result", "[green]passed[/]" if report.passed else "[red]FAILED[/]: " + "; ".join(report.failures))
    console = _stdout_console()
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


_BUILD_STAGES = ("select", "finetune", "export", "validate")


@cli.command("build")
@click.argument("pipeline", metavar="PIPELINE.yaml", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: the build file's out:, else build/ beside it].")
@click.option("--force", is_flag=True, help="Rerun every stage, even those whose inputs did not change.")
@click.option("--rerun", type=click.Choice(_BUILD_STAGES), multiple=True,
              help="Rerun this stage (repeatable); later stages rerun if its output changes.")
@cli_options(SourceOptions, only=("weights_dir",))
@cli_options(ExportOptions, only=("sign_key",))
@cli_options(OutputOptions)
def build_cmd(pipeline, out, force, rerun, **kwargs) -> None:
    """Run select -> finetune -> export -> validate from PIPELINE.yaml, skipping unchanged stages.

    Writes OUT/report.md. Exit code 3 when a budget (accuracy drop, latency, memory) is missed.

    \b
    Examples:
      edgetl build edgetl-demo/pipeline.yaml
      edgetl build edgetl-demo/pipeline.yaml --rerun validate --json > build.json
    """
    from edgetl.pipeline import build

    weights_dir, as_json = parse(SourceOptions, kwargs).weights_dir, parse(OutputOptions, kwargs).as_json
    sign_key = parse(ExportOptions, kwargs).sign_key
    err = _stderr_console()
    result = build(pipeline, out=out, force=True if force else list(rerun), weights_dir=weights_dir, check=False,
                   progress=lambda msg: err.print(msg, highlight=False), progress_bars=True, sign_key=sign_key)
    _finish_build(result, as_json)


@cli.command("demo")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="edgetl-demo", show_default=True,
              help="Folder for the synthetic dataset, the build file and the build.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="Training epochs.")
@click.option("--train-per-class", type=click.IntRange(min=2), default=48, show_default=True,
              help="Synthetic training images per class (validation gets a third, test a sixth).")
@click.option("--device", "-d", default=None, help="Target profile [default: x86-avx2, or raspberry-pi-5 on Arm].")
@click.option("--weights", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True,
              help="imagenet: fine-tune the packaged EfficientNet-Lite0 and compare it with training from scratch; "
                   "none: train ResNet-18 from scratch.")
@click.option("--force", is_flag=True, help="Rerun every stage.")
@cli_options(OutputOptions)
def demo_cmd(out, epochs, train_per_class, device, weights, force, **kwargs) -> None:
    """Run the whole pipeline offline on a synthetic dataset (CPU): transfer from ImageNet weights, in minutes.

    \b
    Examples:
      edgetl demo
      edgetl demo --weights none --out demo-scratch
    """
    from edgetl.demo import run_demo

    as_json = parse(OutputOptions, kwargs).as_json
    err = _stderr_console()
    result = run_demo(out, epochs=epochs, train_per_class=train_per_class, device=device, weights=weights,
                      force=force, check=False, progress=lambda msg: err.print(msg, highlight=False),
                      progress_bars=True)
    if result.baseline and not as_json:
        b = result.baseline
        err.print(f"from scratch with the same budget: val {100 * (b['val_accuracy'] or 0):.1f}%, "
                  f"test {100 * (b['test_accuracy'] or 0):.1f}% ({b['seconds']:.0f} s)", highlight=False)
    _finish_build(result, as_json)


def _finish_build(result, as_json: bool) -> None:
    """Render a BuildResult, then exit 3 if a budget was missed."""

    if as_json:
        emit_json(result.to_dict())
    else:
        from rich.table import Table

        table = Table(title=f"edgetl build · {result.out}")
        for col in ("stage", "status", "why", "time", "result"):
            table.add_column(col, justify="right" if col == "time" else "left")
        for s in result.stages:
            table.add_row(s.name, s.status, s.reason, "—" if s.skipped else f"{s.seconds:.1f} s",
                          _stage_result(s.name, s.summary))
        console = _stdout_console()
        console.print(table)
        console.print(f"artifact: {result.artifact}\nreport:   {result.report}")
        if result.passed:
            console.print("[green]passed[/]")
    if result.failures:
        raise BudgetExceededError(f"{'; '.join(result.failures)} (see {result.report})")


def _stage_result(name: str, s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    if name == "select":
        return f"{s.get('model')} ({s.get('fitting')} of {s.get('candidates')} fit)"
    if name == "finetune":
        return f"{s.get('strategy')}, val {pct(s.get('val_accuracy'))}, test {pct(s.get('test_accuracy'))}"
    if name == "export":
        drop = s.get("drop_pts")
        return f"{s.get('precision')}" + ("" if drop is None else f", drop {drop:.2f} pts")
    if name == "validate":
        budget = s.get("budget_ms")
        verdict = "pass" if s.get("passed") else "FAIL"
        figure = (f"p50 {s.get('p50_ms')} ms" if s.get("judged_ms") is None
                  else f"{s.get('judged_ms')} ms ({s.get('judged_on')})")
        return figure + ("" if budget is None else f" vs {budget:g} ms") + f": {verdict}"
    return ""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgetl")


if __name__ == "__main__":
    sys.exit(main())
