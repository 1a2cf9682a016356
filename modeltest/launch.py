"""Start a run on several devices: dp x tp processes under torchrun, one message at the end.

`modeltest run` (and scripts/mm_run.sh, which calls it) comes here when a run needs more than one
process and is not already inside torchrun. The layout is checked once, before any process
starts; torchrun's launcher (torch.distributed.run) then runs in this process, so that a Ctrl-C
ends in one line that counts the samples every rank saved, and exit code 130 — not a launcher
traceback and one message per rank.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Set

from .backends.traits import traits
from .config.loader import EvalConfig
from .errors import UserError
from .runner import LAUNCHED_ENV


@dataclass
class Layout:
    tp: int  # devices per model replica
    dp: int  # replicas splitting the samples
    nnodes: int  # machines (NNODES), each running the same command

    @property
    def procs(self) -> int:
        return self.tp * self.dp


def inside_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def visible_devices() -> int:
    """Devices named by ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES (0: not set)."""
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES") or os.environ.get("CUDA_VISIBLE_DEVICES") or ""
    return len([d for d in visible.split(",") if d.strip()])


def plan_layout(cfg: EvalConfig) -> Layout:
    """tp and dp of a run: as given, else dp=1 and tp = visible devices x nodes / dp (1 if none)."""
    raw = os.environ.get("NNODES", "1")
    try:
        nnodes = int(raw)
    except ValueError:
        raise UserError(f"NNODES={raw!r} is not a positive integer; export NNODES=<number of nodes>") from None
    dp = cfg.run.dp or 1
    # Only the engine splits a model over devices; hf and a served model run one process per replica.
    default_tp = max(1, visible_devices() * max(nnodes, 1) // dp) if traits(cfg.model.backend).tensor_parallel else 1
    tp = cfg.run.tp or default_tp
    for name, v in (("tp", tp), ("dp", dp), ("NNODES", nnodes)):
        if v < 1:
            raise UserError(f"{name}={v} is not a positive integer")
    if (tp * dp) % nnodes:
        raise UserError(f"dp x tp = {tp * dp} processes do not split over NNODES={nnodes} nodes")
    return Layout(tp=tp, dp=dp, nnodes=nnodes)


def check_layout(cfg: EvalConfig, tp: int, dp: int) -> None:
    """Refuse a layout the backend or the model cannot run, before any process starts."""
    from .engine.config import Qwen2VLConfig

    if tp < 1 or dp < 1:
        raise UserError(f"tp={tp} dp={dp}: both must be at least 1")
    if tp > 1:
        if not traits(cfg.model.backend).tensor_parallel:
            raise UserError(
                f"tp={tp} needs model.backend=engine ({cfg.model.backend} runs one process per replica; use dp=)"
            )
        Qwen2VLConfig.from_path(cfg.model.model_path).check_tensor_parallel(tp, cfg.model.model_path)


def finished_keys(folder: Path) -> Set[str]:
    from .records import RecordStore

    return set(RecordStore(folder, shard="none").load()) if folder.is_dir() else set()


def torchrun(worker_args: List[str], nnodes: int, nproc_per_node: int) -> None:
    """`python -m torch.distributed.run ... -m modeltest WORKER_ARGS` in this process (the
    launcher's SignalException / ChildFailedError reach the caller instead of a traceback)."""
    from torch.distributed.run import parse_args, run

    argv = [
        "--nnodes",
        str(nnodes),
        "--node_rank",
        os.environ.get("NODE_RANK", "0"),
        "--nproc_per_node",
        str(nproc_per_node),
        "--master_addr",
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.environ.get("MASTER_PORT", "20030"),
        "-m",
        "modeltest",
        *worker_args,
    ]
    os.environ[LAUNCHED_ENV] = "1"
    # The launcher's own log lines (a shutdown warning per signal, a failure table) repeat what
    # the workers and the caller say.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")] + [
        "torch.distributed.elastic"
    ]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    run(parse_args(argv))


def launch(cfg: EvalConfig, task: str, model: str, overrides: List[str], layout: Layout) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .outputs import RunPaths

    check_layout(cfg, layout.tp, layout.dp)
    records = RunPaths.for_run(cfg, tp=layout.tp).records_dir
    before = finished_keys(records) if cfg.run.resume else set()
    try:
        torchrun(
            ["run", task, model, *overrides, f"dp={layout.dp}", f"tp={layout.tp}"],
            layout.nnodes,
            layout.procs // layout.nnodes,
        )
    except SignalException as e:
        saved = len(finished_keys(records) - before)
        print(
            f"modeltest: interrupted: {saved} finished sample(s) of this run are saved in {records}; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if codes == [2]:  # a one-line error the workers printed already
            return 2
        print(
            f"modeltest: error: {failed_ranks(e)} (their output is above); finished samples are saved, run the "
            "same command again to resume",
            file=sys.stderr,
        )
        return 130 if 130 in codes else 1
    return 0


def failed_ranks(e) -> str:
    """torchrun's ChildFailedError as one phrase: "rank 1 was killed by SIGABRT", "rank(s) 0, 1
    exited with code(s) 1" (e.failures: global rank -> ProcessFailure)."""
    import signal as signals

    parts = []
    for rank, f in sorted(e.failures.items()):
        if f.exitcode < 0:
            try:
                how = f"was killed by {signals.Signals(-f.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-f.exitcode}"
        else:
            how = f"exited with code {f.exitcode}"
        parts.append(f"rank {rank} {how}")
    return "; ".join(parts)


def launch_serve(argv: List[str], tp: int) -> int:
    """`modeltest serve ... --tp N`: N processes, rank 0 serving HTTP. SIGTERM / Ctrl-C reach the
    workers through the launcher; rank 0 drains and tells the others to stop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun(["serve", *argv, "--tp", str(tp)], 1, tp)
    except SignalException:
        return 0  # a stop was asked for; the workers drained
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if codes != [2]:
            print(f"modeltest serve: error: {failed_ranks(e)} (their output is above)", file=sys.stderr)
        return 2 if codes == [2] else 1
    return 0
