"""``gradprobe run train.py [args]``: run a script under a trace of every leaf, report at exit.

``gradprobe codes [--write README.md]`` prints the finding-codes table (or rewrites it in a README).

# NOTE [running the user's script]
# The script runs in this process with `runpy.run_path(run_name="__main__")`, `sys.argv` set to
# the script and its arguments and `sys.path[0]` to the script's folder, as `python train.py` would.
# The trace has no targets (every leaf any backward reaches) and `on_finding="record"`, so nothing
# the script prints is interleaved with warnings; the report (findings included) is printed once the
# script ends — also when it raises or calls `sys.exit`, after which the CLI exits the way the
# script would have (its traceback and exit status 1, or its own exit code).
# `run_path` returns the script's globals; they are held until the trace has exited, otherwise the
# model is freed first and the report could not read the final `.grad` (a failing script's globals
# stay alive through the traceback's frames).
# A training loop is one trace for the whole script: steps end at each `optimizer.step()` (NOTE
# [steps] in capture/steps.py), `--window N` is `trace(window=N)` (recent steps kept in full, older
# ones folded into the run's aggregates, so memory does not grow with the number of steps), and the
# report at exit is the trace's report of the run. `--live` draws a one-line status at every step
# end (NOTE [live status] in integrations/live.py), only when rich's console is a terminal; it is
# taken off before the report.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback
from typing import TYPE_CHECKING

from gradprobe.api.trace import Trace

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from gradprobe.capture.steps import StepEvent
    from gradprobe.integrations.live import LiveStatus

__all__ = ["main", "run_script"]

_PROG = "gradprobe"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Make PyTorch gradients inspectable without changing your code.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="run a training script under a gradprobe trace and print the report at exit",
        description="Run SCRIPT (with ARGS) under a trace of every leaf any backward reaches; print the "
        "report and findings when it ends, also when it fails.",
    )
    run.add_argument("--json", metavar="PATH", help="also write everything recorded as JSON (Trace.to_dict())")
    run.add_argument("--html", metavar="PATH", help="also write the report as a standalone HTML page")
    run.add_argument("--keep", choices=("stats", "tensors"), default="stats", help="what to keep per part (default: stats)")
    run.add_argument(
        "--detect",
        default="default",
        metavar="WHICH",
        help="mistake detectors: 'default', 'all', or detector names separated by commas (trace(detect=...))",
    )
    run.add_argument(
        "--decompose",
        action="store_true",
        help="split each backward of a combined loss into the part each loss added (trace(decompose=True))",
    )
    run.add_argument(
        "--decompose-every",
        type=int,
        metavar="N",
        help="decompose every N-th backward only (trace(decompose='every:N'); implies --decompose)",
    )
    run.add_argument(
        "--on-finding",
        choices=("record", "warn", "raise"),
        default="record",
        help="what a finding does while the script runs (default: record; all are in the report at the end)",
    )
    run.add_argument(
        "--window",
        type=_positive,
        metavar="N",
        help="keep the last N training steps in full detail, older ones as running aggregates "
        "(trace(window=N); default: the trace's own)",
    )
    run.add_argument(
        "--live",
        action="store_true",
        help="show a one-line status (step, steps/s, top findings) while the script runs; only on a terminal",
    )
    run.add_argument("--quiet", action="store_true", help="do not print the report (files are still written)")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the script")
    parser.set_defaults(run_options=sorted({o for a in run._actions for o in a.option_strings} - {"-h", "--help"}))
    codes = commands.add_parser(
        "codes",
        help="print the finding codes table (Markdown), or write it into a README between its markers",
        description="Print every finding code, one line each, as the README's Markdown table.",
    )
    codes.add_argument(
        "--write", metavar="PATH",
        help=f"replace the table between {CODES_START!r} and {CODES_END!r} in PATH (e.g. README.md)",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps, at least 1: {text!r}")
    return value


CODES_START, CODES_END = "<!-- codes:start -->", "<!-- codes:end -->"


def write_codes(path: str) -> bool:
    """Put the generated codes table between the markers of the file at ``path``; True when it changed."""
    from gradprobe.detectors import codes_markdown

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, start, rest = text.partition(CODES_START)
    _, end, tail = rest.partition(CODES_END)
    if not start or not end:
        raise ValueError(f"{path} has no {CODES_START} ... {CODES_END} markers")
    new = f"{head}{CODES_START}\n{codes_markdown()}{CODES_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != text


def run_script(
    script: str,
    args: Sequence[str] = (),
    *,
    keep: str = "stats",
    json_path: str | None = None,
    html_path: str | None = None,
    quiet: bool = False,
    detect: str | Sequence[str] = "default",
    decompose: bool | str = False,
    on_finding: str = "record",
    window: int | None = None,
    live: bool = False,
) -> tuple[Trace, BaseException | None]:
    """Run ``script`` as ``__main__`` under a trace; write the report/files; return the trace and any error.

    ``window``: ``trace(window=...)`` (None: the trace's default); ``live``: a status line while it runs.
    The script's exception (or ``SystemExit``) is returned, not raised, so the caller decides how to exit.

    Raises:
        FileNotFoundError: there is no script at ``script``.
        SyntaxError: the script does not compile (nothing runs, no report is printed).
    """
    if not os.path.isfile(script):
        where = os.path.abspath(script)
        hint = " (it is a folder; name the script inside it)" if os.path.isdir(script) else ""
        raise FileNotFoundError(f"gradprobe run: no script at {where}{hint}; usage: gradprobe run train.py [args]")
    with open(script, "rb") as fh:
        compile(fh.read(), script, "exec")  # a SyntaxError now, before an empty report
    options: dict[str, object] = {"window": window} if window is not None else {}
    tracer = Trace((), keep=keep, on_finding=on_finding, detect=detect, decompose=decompose, **options)  # type: ignore[arg-type]
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [script, *args]
    folder = os.path.dirname(os.path.abspath(script))
    if sys.path:
        sys.path[0] = folder
    else:
        sys.path.insert(0, folder)
    error: BaseException | None = None
    namespace: dict[str, object] = {}  # the script's globals stay alive until the trace took its finals
    status = _live_status(tracer) if live else None
    try:
        with tracer:
            try:
                namespace = runpy.run_path(script, run_name="__main__")
            except BaseException as exc:  # SystemExit and KeyboardInterrupt too: report first
                error = exc
    finally:
        if status is not None:
            status.stop()
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0
    _write_outputs(tracer, json_path, html_path, quiet)
    namespace.clear()
    return tracer, error


def _live_status(tracer: Trace) -> LiveStatus:
    """A live status line on rich's console, redrawn at every step end of ``tracer`` (NOTE [live status])."""
    import rich

    from gradprobe.capture.steps import steps_of
    from gradprobe.integrations.live import LiveStatus
    from gradprobe.integrations.steps import NewFindings

    status, new = LiveStatus(rich.get_console()), NewFindings()

    def at_step_end(trace: Trace, event: StepEvent) -> None:  # after optimizer.step(), never in an autograd hook
        status.add_findings(new(trace))
        status.update(event.index)

    if status.enabled:
        steps_of(tracer).on_end("live status", at_step_end)
    return status


def _write_outputs(tracer: Trace, json_path: str | None, html_path: str | None, quiet: bool) -> None:
    import rich

    if not quiet:
        rich.get_console().print(tracer)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(tracer.to_dict(), fh, indent=2)
    if html_path:
        from gradprobe.report.export import render

        with open(html_path, "w", encoding="utf-8") as fh:
            fh.write(render(tracer).export_html(inline_styles=True))


def _user_traceback(error: BaseException) -> TracebackType | None:
    """The traceback from the script's first frame on (no gradprobe / runpy frames above it)."""
    tb = error.__traceback__
    plumbing = (__file__, runpy.__file__, "<frozen runpy>")
    while tb is not None and tb.tb_frame.f_code.co_filename in plumbing:
        tb = tb.tb_next
    return tb or error.__traceback__


def _misplaced(ours: Sequence[str], args: Sequence[str]) -> list[str]:
    """Arguments after the script name that are ``gradprobe run`` options (they go to the script)."""
    return [a for a in args if a.split("=", 1)[0] in ours]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradprobe`` and ``python -m gradprobe``; returns the exit status."""
    options = _parser().parse_args(argv)
    if options.command == "codes":
        from gradprobe.detectors import codes_markdown

        if options.write:
            try:
                changed = write_codes(options.write)
            except (OSError, ValueError) as exc:
                print(f"{_PROG}: error: {exc}", file=sys.stderr)
                return 2
            print(f"{options.write}: {'updated' if changed else 'already up to date'}")
        else:
            print(codes_markdown(), end="")
        return 0
    misplaced = _misplaced(options.run_options, options.args)
    if misplaced:
        print(
            f"{_PROG}: warning: {', '.join(misplaced)} after the script name {'go' if len(misplaced) > 1 else 'goes'} "
            f"to the script, not to gradprobe; put gradprobe's options before it: "
            f"gradprobe run {' '.join(misplaced)} ... {options.script}",
            file=sys.stderr,
        )
    detect: str | list[str] = options.detect
    if detect not in ("default", "all"):
        detect = [name.strip() for name in detect.split(",") if name.strip()]
    decompose: bool | str = options.decompose
    if options.decompose_every is not None:
        decompose = f"every:{options.decompose_every}"
    try:
        _, error = run_script(
            options.script,
            options.args,
            keep=options.keep,
            json_path=options.json,
            html_path=options.html,
            quiet=options.quiet,
            detect=detect,
            decompose=decompose,
            on_finding=options.on_finding,
            window=options.window,
            live=options.live,
        )
    except FileNotFoundError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SyntaxError as exc:
        print("".join(traceback.format_exception_only(type(exc), exc)), end="", file=sys.stderr)
        print(f"{_PROG}: {options.script} does not compile; nothing ran", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --detect / --decompose-every value
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        code = error.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    traceback.print_exception(type(error), error, _user_traceback(error))
    print(f"{_PROG}: {options.script} raised {type(error).__name__}; the report above covers what ran before it", file=sys.stderr)
    return 1
