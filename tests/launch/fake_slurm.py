"""Stand-ins for ``sbatch``, ``scontrol``, ``srun``, ``squeue`` and ``sacct`` (test helper).

``FakeSlurm(dir).install()`` writes five executables into ``dir/bin`` (put it first on PATH).
Each appends ``{"cmd", "argv", "env", ...}`` to ``dir/calls.jsonl`` and emulates what the job
script relies on:

* ``sbatch``: reads the script's ``#SBATCH`` lines the way SLURM does (up to the first command),
  lets command-line options override them, assigns job ids from ``dir/next_id``, prints the id
  (``--parsable``) and records the job as PENDING. ``FAKE_SBATCH_FAIL=1``: refuses.
* ``scontrol show hostnames LIST``: expands ``node[001-003,007],gpu5``; ``scontrol requeue ID``:
  records it (``FAKE_REQUEUE_RC``: its exit status).
* ``srun --opt=value ... CMD``: starts nodes x ntasks-per-node copies of CMD with SLURM_PROCID,
  SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS set, forwards SIGUSR1/SIGTERM/SIGINT to them and exits
  with the highest task status (128 + signal for a killed task), as srun does. ``FAKE_SRUN_EXIT=N``
  runs nothing: it waits ``FAKE_SRUN_SLEEP`` seconds (``FAKE_SRUN_STOP_AFTER`` signals, default 1, end
  the wait with exit ``FAKE_SRUN_ON_SIGNAL``, default 6), creates ``FAKE_SRUN_TOUCH`` (e.g. a checkpoint's COMPLETE marker) and exits N.
* ``squeue`` / ``sacct``: ``id|STATE`` lines from ``dir/jobs.json`` (queued / finished jobs).

``segment_env(...)`` is the environment SLURM gives a batch script on its first node.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import sys
from pathlib import Path

COMMON = r'''
import json, os, re, signal, subprocess, sys, time
STATE = os.environ["FAKE_SLURM_DIR"]

def record(cmd, **extra):
    env = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "MASTER_", "NCCL_", "CUDA_", "TORCH_",
                                                                 "PYTHONUNBUFFERED", "OMP_", "SBATCH_"))}
    with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"cmd": cmd, "argv": sys.argv[1:], "env": env, **extra}) + "\n")

def jobs():
    p = os.path.join(STATE, "jobs.json")
    return json.load(open(p)) if os.path.exists(p) else {}

def save_jobs(j):
    json.dump(j, open(os.path.join(STATE, "jobs.json"), "w"))

def expand(nodelist):
    out = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        base, ranges = m.group(1), m.group(2)
        if not ranges:
            out.append(base)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{base}{i:0{len(lo)}d}")
    return out
'''

SBATCH = r'''
argv = sys.argv[1:]
script = [a for a in argv if not a.startswith("-")][-1]
directives = {}
for line in open(script):
    s = line.strip()
    if s.startswith("#SBATCH"):
        key, _, val = s[len("#SBATCH"):].strip().partition("=")
        directives[key] = val
    elif s and not s.startswith("#"):
        break  # SLURM stops reading #SBATCH lines at the first command
effective = dict(directives)
for a in argv:
    if a.startswith("--"):
        k, _, v = a.partition("=")
        effective[k] = v
if os.environ.get("FAKE_SBATCH_FAIL"):
    record("sbatch", refused=True)
    print("sbatch: error: Batch job submission failed: Invalid account or account/partition combination",
          file=sys.stderr)
    sys.exit(1)
counter = os.path.join(STATE, "next_id")
jid = int(open(counter).read()) if os.path.exists(counter) else 5000
open(counter, "w").write(str(jid + 1))
record("sbatch", script=script, directives=directives, effective=effective, job_id=str(jid))
j = jobs(); j[str(jid)] = "PENDING"; save_jobs(j)
print(f"{jid}" if "--parsable" in argv else f"Submitted batch job {jid}")
'''

SCONTROL = r'''
args = sys.argv[1:]
record("scontrol")
if args[:2] == ["show", "hostnames"]:
    print("\n".join(expand(args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"])))
elif args[:1] == ["requeue"]:
    j = jobs(); j[args[1]] = "REQUEUED"; save_jobs(j)
    sys.exit(int(os.environ.get("FAKE_REQUEUE_RC", "0")))
else:
    sys.exit(f"fake scontrol: unsupported {args}")
'''

SRUN = r'''
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("--"):
    k, _, v = args[i].partition("=")
    opts[k] = v
    i += 1
cmd = args[i:]
nodes = int(opts.get("--nodes", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
per = int(opts.get("--ntasks-per-node", "1"))
hosts = expand(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
record("srun", opts=opts, command=cmd)
got = []

if "FAKE_SRUN_EXIT" in os.environ:  # no training: a crash, a hang until a signal, or a fake progress
    def stop(sig, _f):
        got.append(signal.Signals(sig).name)
        record("srun-signal", signal=got[-1])
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, stop)
    deadline = time.time() + float(os.environ.get("FAKE_SRUN_SLEEP", "0"))
    while time.time() < deadline and len(got) < int(os.environ.get("FAKE_SRUN_STOP_AFTER", "1")):
        time.sleep(0.02)
    if os.environ.get("FAKE_SRUN_TOUCH"):
        os.makedirs(os.path.dirname(os.environ["FAKE_SRUN_TOUCH"]), exist_ok=True)
        open(os.environ["FAKE_SRUN_TOUCH"], "w").close()
    record("srun-exit", signals=got)
    sys.exit(int(os.environ.get("FAKE_SRUN_ON_SIGNAL", "6")) if got else int(os.environ["FAKE_SRUN_EXIT"]))

n = nodes * per
procs = []
for r in range(n):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per), SLURM_NODEID=str(r // per),
               SLURM_NTASKS=str(n), SLURM_NPROCS=str(n), SLURM_STEP_NUM_TASKS=str(n),
               SLURMD_NODENAME=hosts[min(r // per, len(hosts) - 1)])
    procs.append(subprocess.Popen(cmd, env=env))

def forward(sig, _f):
    got.append(signal.Signals(sig).name)
    record("srun-signal", signal=got[-1])
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
codes = [p.wait() for p in procs]
record("srun-exit", signals=got, codes=codes)
sys.exit(max((128 - c) if c < 0 else c for c in codes))
'''

SQUEUE = r'''
ids = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--jobs=")), "").split(",")
for jid, state in jobs().items():
    if jid in ids and state in ("PENDING", "RUNNING", "REQUEUED"):
        print(f"{jid}|{state}")
'''

SACCT = r'''
ids = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--jobs=")), "").split(",")
for jid, state in jobs().items():
    if jid in ids and state not in ("PENDING", "RUNNING", "REQUEUED"):
        print(f"{jid}|{state}")
        print(f"{jid}.batch|{state}")
'''


class FakeSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.bin = self.root / "bin"

    def install(self) -> FakeSlurm:
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, body in (("sbatch", SBATCH), ("scontrol", SCONTROL), ("srun", SRUN), ("squeue", SQUEUE),
                           ("sacct", SACCT)):
            path = self.bin / name
            path.write_text(f"#!{sys.executable}\n{COMMON}\n{body}")
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return self

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(self.root)}

    def calls(self, cmd: str | None = None) -> list[dict]:
        path = self.root / "calls.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if cmd is None or r["cmd"] == cmd]

    def set_state(self, job_id: str, state: str) -> None:
        path = self.root / "jobs.json"
        jobs = json.loads(path.read_text()) if path.exists() else {}
        jobs[job_id] = state
        path.write_text(json.dumps(jobs))

    def start_ids_at(self, job_id: int) -> None:
        (self.root / "next_id").write_text(str(job_id))

    def segment_env(self, job_id: str, *, nodelist: str = "localhost", nodes: int = 1, restart: int = 0,
                    **extra: str) -> dict[str, str]:
        """What SLURM sets for a batch script (on the allocation's first node), plus the stand-ins."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FAKE_SRUN", "RANK", "WORLD_SIZE",
                                                                       "LOCAL_RANK", "MASTER_"))}
        env.update(self.env())
        env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes),
                   SLURM_NNODES=str(nodes), SLURM_RESTART_COUNT=str(restart), SLURM_JOB_NAME="fake",
                   OMP_NUM_THREADS="1", **extra)
        return env


def job_id_with_free_port() -> int:
    """A job id whose MASTER_PORT (20000 + id % 10000, see launch/script.py) is free right now."""
    for _ in range(200):
        jid = random.randrange(100_000, 900_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + jid % 10000))
            except OSError:
                continue
        return jid
    raise RuntimeError("no free port in 20000-29999")
