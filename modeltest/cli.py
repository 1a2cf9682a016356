"""Command line: `modeltest run | check | list | demo | bench`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from .errors import Interrupted, UserError


def _cmd_run(args) -> int:
    """One process runs the evaluation here; several (dp x tp > 1) are launched under torchrun,
    unless this process is one of them already."""
    from .config import load_config
    from .core import run_failure
    from .launch import inside_torchrun, launch, plan_layout
    from .runner import Evaluator
    from .tasks import TASKS

    cfg = load_config(TASKS, args.task, args.model, args.overrides)
    if not inside_torchrun():
        layout = plan_layout(cfg)
        if layout.procs > 1:
            return launch(cfg, args.task, args.model, args.overrides, layout)
    result = Evaluator(cfg).run()
    failure = run_failure(result.records, cfg.run.fail_on_errors)  # (records: rank 0's, all of them)
    if failure:
        print(f"modeltest: {failure}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args) -> int:
    """Validate a run without running it: config, paths, and the parallel layout."""
    from .config import load_config
    from .launch import check_layout, plan_layout
    from .tasks import TASKS

    cfg = load_config(TASKS, args.task, args.model, args.overrides)
    layout = plan_layout(cfg)
    check_layout(cfg, layout.tp, layout.dp)
    return 0


def _cmd_serve(args) -> int:
    """One process serves; with a tensor-parallel size above 1 (--tp, or the visible devices),
    torchrun starts that many and rank 0 serves HTTP."""
    from .launch import inside_torchrun, launch_serve, visible_devices
    from .serve.config import serve_config_from_args
    from .serve.server import run_server

    cfg = serve_config_from_args(args)
    tp = args.tp or max(1, visible_devices())
    if tp > 1 and not inside_torchrun():
        from .engine.config import Qwen2VLConfig

        # refuse a bad size before starting
        Qwen2VLConfig.from_path(cfg.model_path).check_tensor_parallel(tp, cfg.model_path)
        return launch_serve(_strip_tp(args.argv), tp)
    return run_server(cfg)


def _strip_tp(argv: List[str]) -> List[str]:
    """The serve arguments without --tp (the launcher adds the size it chose)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--tp":
            skip = True
        elif not a.startswith("--tp="):
            out.append(a)
    return out


def _cmd_list(args) -> int:
    from .config.loader import available, default_config_dir

    d = default_config_dir()
    print("tasks :", ", ".join(available(d, "task")))
    print("models:", ", ".join(available(d, "model")))
    return 0


def _cmd_demo(args) -> int:
    from .demo.build import build_demo, build_demo_qwen2_5_vl, run_demo

    paths = build_demo(args.dir, force=args.force)
    if args.model == "qwen2_5_vl":
        build_demo_qwen2_5_vl(paths, force=args.force)
    if args.build_only:
        print(f"demo built in {paths.root}")
        return 0
    return run_demo(paths, extra=args.overrides, model_name=args.model)


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("modeltest")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modeltest", description="Accuracy and speed evaluation of Qwen2-VL.")
    p.add_argument("--version", action="version", version=f"modeltest {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate MODEL on TASK (configs/task/TASK.yaml, configs/model/MODEL.yaml)")
    r.add_argument("task")
    r.add_argument("model")
    r.add_argument("overrides", nargs="*", help="key=value, e.g. model.model_path=/w batch_size=8 limit=50")
    r.set_defaults(func=_cmd_run)
    sub.add_parser("list", help="list the available tasks and models").set_defaults(func=_cmd_list)
    c = sub.add_parser("check", help="validate a run's configuration and parallel layout without running it")
    c.add_argument("task")
    c.add_argument("model")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_cmd_check)
    d = sub.add_parser("demo", help="build a tiny random Qwen2-VL and small datasets offline, then run both tasks")
    d.add_argument("--dir", default="demo_data", help="where to build (default: ./demo_data)")
    d.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    d.add_argument("--build-only", action="store_true", help="build, do not run")
    d.add_argument(
        "--model",
        choices=("qwen2_vl", "qwen2_5_vl"),
        default="qwen2_vl",
        help="the tiny model's family (qwen2_5_vl: a tiny random Qwen2.5-VL, transformers >= 4.49)",
    )
    d.add_argument("overrides", nargs="*", help="extra key=value passed to both runs")
    d.set_defaults(func=_cmd_demo)
    from .bench.run import add_parser as add_bench

    add_bench(sub)
    from .bench.serve_bench import add_parser as add_bench_serve

    add_bench_serve(sub)
    from .bench.prep import add_parser as add_bench_prep

    add_bench_prep(sub)
    from .report.cli import add_parser as add_report

    add_report(sub)
    from .serve.config import add_serve_parser

    add_serve_parser(sub)
    sub.choices["serve"].set_defaults(func=_cmd_serve)
    return p


def quiet_libraries() -> None:
    """transformers 4.46 warns about its own deprecations on every model build, and qwen-vl-utils
    warns on every video whose max_pixels exceeds the per-frame limit it computes (it then uses
    that limit, as the reference does): once per sample, through a progress bar, for nothing a
    user can act on."""
    import logging

    logging.getLogger("qwen_vl_utils").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def restore_ctrl_c() -> None:
    """Make SIGINT stop a run even when it was started with SIGINT ignored (a background job of a
    script, some CI runners, nohup-like wrappers): a run is long, and SIGINT is how a user or a
    supervisor asks it to stop cleanly, keeping every finished sample."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may come after a command's --options (`bench-serve T M --max-tokens 8
    # model.api_base=URL`): argparse leaves those over; anything else left over is an error
    if (
        unknown
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in u and not u.startswith("-") for u in unknown)
    ):
        args.overrides += unknown
    elif unknown:
        parser.parse_args(argv)  # argparse's own one-line error, exit 2
    args.argv = argv[1:]  # the subcommand's own arguments (the launcher passes them on)
    quiet_libraries()
    restore_ctrl_c()
    try:
        return args.func(args)
    except UserError as e:
        print(f"modeltest: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        from .runner import LAUNCHED_ENV

        if not os.environ.get(LAUNCHED_ENV):  # else the launcher reports it once, for every rank
            print(f"modeltest: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("modeltest: interrupted before any sample ran; nothing to resume", file=sys.stderr)
        return 130


def exit_process(code: int) -> None:
    """End this process with `code`. A process that torchrun started (a rank of a dp x tp run or
    a tensor-parallel server) ends without the interpreter's teardown: its files are closed and
    fsync'd by then, and C++ threads of the libraries it used (gloo, decord) torn down by static
    destructors can abort it ("terminate called without an active exception"), which makes the
    launcher stop every other rank — turning a finished run into a failed one."""
    from .launch import inside_torchrun

    if inside_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
