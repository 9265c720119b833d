"""Several `cptrain train` runs in one torchrun launch: every launch costs each rank seconds of
imports, so the distributed tests launch once and train all their runs in turn.

    torchrun --nproc_per_node=2 tests/dist_jobs.py JOBS.json

JOBS.json lists {"argv": [...], "audit": DIR or null} in order. The ranks join one process
group (cptrain leaves a group it did not create open) and run each job's `cptrain` command
line. Where "audit" is set, each rank writes DIR/rank_R.json: every file it opened for writing
under the run's replay directory. The launch stops at the first job that fails, with its exit
code; DONE.json beside JOBS.json lists the jobs that finished.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from cptrain.cli import main

written: set[str] = set()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def hook(event: str, args: tuple) -> None:
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    mode, flags = args[1], args[2]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & WRITE_FLAGS
    )
    if writing and "/replay/" in path:
        written.add(os.path.realpath(path))


def run(jobs_file: Path) -> int:
    jobs = json.loads(jobs_file.read_text())
    rank = int(os.environ["RANK"])
    done: list[int] = []
    dist.init_process_group("gloo")
    try:
        for i, job in enumerate(jobs):
            written.clear()
            code = main(job["argv"])
            if job.get("audit"):
                out = Path(job["audit"])
                out.mkdir(parents=True, exist_ok=True)
                (out / f"rank_{rank}.json").write_text(json.dumps(sorted(written)))
            if code != 0:
                return code
            done.append(i)
            if rank == 0:
                (jobs_file.parent / "DONE.json").write_text(json.dumps(done))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.addaudithook(hook)
    sys.exit(run(Path(sys.argv[1])))
