"""The ``thermoscope`` command: analyze, report, check, cluster, demo.

Exit codes: 0 success; 1 findings (``check`` found bad files); 2 bad input or usage (one-line
message naming the file and the reason); 3 internal error (``--debug`` shows the traceback);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace

from pipeline.core.errors import ThermoscopeError
from pipeline.measure import forkserver

EPILOG = """examples:
  thermoscope analyze runs/my_run --store my_run.zarr          # one run (flat or Trainer layout)
  thermoscope analyze sweeps/lr_sweep --store sweep.zarr --spectral
  thermoscope analyze ckpts --store out.zarr --scheduler tcp://10.0.0.5:8786
  thermoscope report my_run.zarr --out my_report                # -> my_report/index.html
  thermoscope check runs/my_run                                 # validate inputs only
  thermoscope check s3://bucket/run --steps 1000:5000 --layers '*attn*'  # + bytes and time
  thermoscope analyze hf://EleutherAI/pythia-70m --store p.zarr --steps ::10  # Hub revisions
  thermoscope demo data/demo                                    # generate the demo series
  thermoscope cluster stop                    # close the local cluster runs keep up (300 s idle)

exit codes: 0 ok, 1 check found bad files, 2 bad input, 3 internal error, 130 interrupted
"""


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--debug/--quiet/--json-log, accepted before or after the command (``suppress``: the
    subcommand's copy sets them only when given, so it never undoes the main parser's)."""
    c = argparse.ArgumentParser(add_help=False)
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    c.add_argument("--debug", action="store_true", help="show the traceback of an error", **kw)
    c.add_argument("--quiet", action="store_true", help="print nothing on success", **kw)
    c.add_argument(
        "--json-log", action="store_true", help="progress and results as JSON lines on stderr", **kw
    )
    return c


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thermoscope",
        description="Thermodynamics of training, measured from checkpoint series.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(False)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = {
        "epilog": EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "parents": [_common(True)],
    }
    a = sub.add_parser("analyze", help="measure a run or sweep folder into a Zarr store", **common)
    a.add_argument("path", help="run folder (checkpoints) or sweep folder (folder of run folders)")
    a.add_argument("--store", required=True, help="output Zarr store (replaced atomically)")
    a.add_argument("--params", default=None, help="params.yaml with measure/thermo/dask sections")
    a.add_argument(
        "--spectral", action="store_true", help="also SVD metrics (spectral entropy, stable rank)"
    )
    a.add_argument(
        "--spectral-every",
        type=int,
        default=None,
        metavar="K",
        help="with --spectral (implied): spectra at every K-th checkpoint of a run only "
        "(K times fewer; NaN between; measure.spectral_every)",
    )
    a.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable checkpoints, record why"
    )
    a.add_argument(
        "--base-model",
        default=None,
        help="LoRA adapter series: the base model's safetensors file or folder "
        "(layers = W0 + dW; without it the update dW alone)",
    )
    a.add_argument(
        "--lora-raw", action="store_true", help="LoRA adapter series: also the raw A and B"
    )
    a.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    a.add_argument(
        "--workers", type=int, default=None, help="local cluster size (default: one per core)"
    )
    workers = a.add_mutually_exclusive_group()
    workers.add_argument(
        "--threads",
        action="store_true",
        help="local workers as threads of this process (share its GIL: slower)",
    )
    workers.add_argument(
        "--processes",
        action="store_true",
        help="local workers as processes (the default, unless params.yaml says otherwise)",
    )
    a.add_argument(
        "--keep-alive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep the local cluster up this long after the run for the next one to join "
        "(default 300; 0: off; dask.keep_alive_s)",
    )
    a.add_argument(
        "--cache", default=None, help="measurement cache folder (default: next to the store)"
    )
    r = sub.add_parser("report", help="render the HTML report of a store", **common)
    r.add_argument("store")
    r.add_argument("--out", required=True, help="report folder (index.html, metrics.json, plots/)")
    c = sub.add_parser(
        "check",
        help="validate every input file and print the bytes to read and the time it will take",
        **common,
    )
    c.add_argument("path", help="run or sweep folder, or its URL")
    c.add_argument(
        "--params", default=None, help="params.yaml whose thermo section the forecast applies"
    )
    for sp in (a, c):
        sp.add_argument(
            "--steps",
            default=None,
            help='checkpoints: "100:2000" (steps, inclusive), "::5" (every 5th), "100:2000:5"',
        )
        sp.add_argument(
            "--layers", default=None, help='layers: globs "*attn*,lm_head.weight" or "re:<regex>"'
        )
    k = sub.add_parser("cluster", help="the resident local cluster runs leave up", **common)
    k.add_argument("action", choices=["stop"], help="stop: close every resident cluster now")
    d = sub.add_parser("demo", help="generate the demo series (real training on digits)", **common)
    d.add_argument("root", nargs="?", default="data/demo")
    return p


def _settings(args):
    """params.yaml (when given) with the command line's overrides on top."""
    from pipeline.settings import Settings, load_params

    settings = Settings.from_params(load_params(args.params) if args.params else None)
    processes = False if args.threads else True if args.processes else settings.dask.processes
    return replace(
        settings,
        checkpoints=replace(
            settings.checkpoints,
            skip_bad=args.skip_bad or settings.checkpoints.skip_bad,
            base_model=args.base_model or settings.checkpoints.base_model,
            lora_raw=args.lora_raw or settings.checkpoints.lora_raw,
            steps=args.steps or settings.checkpoints.steps,
            layers=args.layers or settings.checkpoints.layers,
        ),
        measure=replace(
            settings.measure,
            spectral=args.spectral or bool(args.spectral_every) or settings.measure.spectral,
            spectral_every=args.spectral_every or settings.measure.spectral_every,
        ),
        dask=replace(
            settings.dask,
            scheduler_address=args.scheduler or settings.dask.scheduler_address,
            n_workers=args.workers or settings.dask.n_workers,
            processes=processes,
            keep_alive_s=settings.dask.keep_alive_s if args.keep_alive is None else args.keep_alive,
        ),
    )


def _analyze(args, progress) -> dict:
    from pipeline.ingest.discovery import discover
    from pipeline.ingest.selection import select

    settings = _settings(args)
    ck = settings.checkpoints
    skip = ck.skip_bad
    # Validate every input (headers only) before loading torch/Dask: bad input fails in well
    # under a second; the manifest is then handed to analyze().
    manifest = select(discover(args.path, skip, ck.base_model, ck.lora_raw), ck.steps, ck.layers)
    # worker processes may be forked: start their imports now, beside this process's
    forkserver.start_early(settings.dask)

    from pipeline.analyze import analyze

    store = analyze(
        args.path,
        args.store,
        settings.measure,
        settings.dask,
        settings.thermo,
        skip_bad=skip,
        cache_dir=args.cache,
        progress=progress,
        manifest=manifest,
    )
    return {"store": str(store)}


def _report(args, progress) -> dict:
    from pipeline.report.render import render_report

    return {"report": str(render_report(args.store, args.out))}


def _check(args, progress) -> dict:
    from pipeline.ingest.validate import check_and_plan, format_forecast, format_plan, format_table
    from pipeline.settings import Settings, load_params

    thermo = Settings.from_params(load_params(args.params) if args.params else None).thermo
    rows, plan = check_and_plan(args.path, args.steps, args.layers, thermo)
    if not args.json_log:
        if plan:  # before the table, whose last line is the count
            print(format_plan(plan))
            print(format_forecast(plan["forecast"]))
        print(format_table(rows))
    bad = sum(r["verdict"] != "ok" for r in rows)
    out = {"files": len(rows), "bad": bad, "exit": 1 if bad else 0}
    if plan:
        out.update(bytes_to_read=plan["bytes"], estimated_seconds=list(plan["seconds"]))
        out["identifiable_cells"] = {
            r["run"]: [r["possible"], r["cells"]] for r in plan["forecast"]
        }
    return out


def _cluster(args, progress) -> dict:
    from pipeline.measure.resident import stop_all

    return {"stopped": stop_all()}


def _demo(args, progress) -> dict:
    from pipeline.demo import make_demo

    return {"demo": str(make_demo(args.root))}


COMMANDS = {
    "analyze": _analyze,
    "report": _report,
    "check": _check,
    "cluster": _cluster,
    "demo": _demo,
}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from pipeline.core.progress import progress_printer

    progress = progress_printer("quiet" if args.quiet else "json" if args.json_log else "bar")
    if args.json_log:
        warnings.showwarning = _json_warning
    started = time.time()
    try:
        result = COMMANDS[args.command](args, progress)
    except ThermoscopeError as exc:
        return _fail(args, exc, 2)
    except KeyboardInterrupt:
        print("thermoscope: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        return _fail(args, exc, 3, internal=True)
    result["seconds"] = round(time.time() - started, 3)
    if args.json_log:
        print(json.dumps({"event": "done", "command": args.command, **result}), file=sys.stderr)
    elif not args.quiet and args.command != "check":
        print(" ".join(f"{k}={v}" for k, v in result.items()))
    return int(result.pop("exit", 0))


def _json_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """--json-log: a Python warning becomes one JSON line too."""
    print(
        json.dumps(
            {
                "event": "warning",
                "category": category.__name__,
                "message": str(message),
                "where": f"{filename}:{lineno}",
            }
        ),
        file=sys.stderr,
    )


def _fail(args, exc, code, internal=False) -> int:
    if args.debug:
        traceback.print_exception(exc, file=sys.stderr)
    what = f"internal error ({exc.__class__.__name__}): {exc}" if internal else str(exc)
    if args.json_log:
        print(
            json.dumps({"event": "error", "command": args.command, "message": what}),
            file=sys.stderr,
        )
    else:
        print(f"thermoscope {args.command}: error: {what}", file=sys.stderr)
    return code


def console() -> None:
    """The ``thermoscope`` executable: ``main``, then exit without tearing the interpreter down.

    Everything the command writes is closed by then (stores are written atomically, streams
    flushed here); what ``os._exit`` skips is freeing every module (torch's libraries, Dask's
    threads): ~0.5-0.8 s after the work on a small run, measured (benchmarks/startup.py)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
