"""Independent tasks side by side: each in its own spawned process, at most `jobs` at once, each writing its
output to its own log file (`mllm-mod study --jobs N` runs one seed per task).

A fresh process per task: nothing (threads, open files, imported state) leaks from one task into the next,
and a task's log holds only its own output, the traceback of a failure included. The first failure, or a
Ctrl-C, stops the tasks still running and is raised naming the task and its log.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str  # for messages, e.g. "study seed 1"
    target: Callable[..., None]  # a module-level function (spawned processes import it by name)
    args: tuple[Any, ...]
    log: Path


def run_logged(log: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """In the child process: stdout and stderr appended to `log` at the file-descriptor level (tqdm and
    libraries that write to the descriptors follow), then `target(*args)`; a failure's traceback is written
    to the log before the process exits non-zero."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            target(*args)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def run_side_by_side(
    tasks: Sequence[Task], jobs: int, poll: Callable[[], None] | None = None, interval: float = 2.0
) -> None:
    """Run `tasks` in order, at most `jobs` at once, one spawned process each; `poll` is called every
    `interval` seconds while they run (e.g. to move a progress bar). Raises RuntimeError on the first task
    that fails, after terminating the others."""
    if jobs < 1:
        raise ValueError(f"jobs must be positive, got {jobs}")
    context = multiprocessing.get_context("spawn")  # no forked torch / tokenizer threads
    queue = list(tasks)
    running: dict[Any, Task] = {}  # process -> its task
    try:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.pop(0)
                process = context.Process(target=run_logged, args=(str(task.log), task.target, task.args), name=task.name)
                process.start()
                running[process] = task
            wait([p.sentinel for p in running], timeout=interval)
            for process in [p for p in running if p.exitcode is not None]:
                task = running.pop(process)
                if process.exitcode != 0:
                    raise RuntimeError(f"{task.name} failed (exit code {process.exitcode}; see {task.log})")
            if poll is not None:
                poll()
    finally:
        for process in running:
            if process.is_alive():
                process.terminate()
        for process in running:
            process.join()
