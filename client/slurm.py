"""`psana-ipc slurm`: one batch job that runs iserver in the psana environment
and the user's client in theirs, correct by construction.

The job script starts one iserver per node on a node-local UNIX socket, waits
for every server's ready file (never a fixed sleep), runs the client command
on every task with PSANA_IPC_ADDRESS pointing at its own node's server, and
stops the servers on every exit path: a shutdown request, then SIGTERM, then
SIGKILL, then `psana-ipc cleanup` for leftover segments. The job's exit code
is the client's. Facility presets follow the btx JobScheduler (S3DF, SLAC,
SRCF_FFB) so existing job headers keep their meaning.

Preemption (client/preemption.py): `--warn-before S` has SLURM signal the
job S seconds before its time limit, and the script passes SIGUSR2 on to
the client (every task), which can checkpoint; with `--requeue` SLURM may
requeue the job when it is preempted, and the script requeues it itself
when the client exits 75 (preemption.RESUME_EXIT).

With `--server-nodes N` the job is heterogeneous: the client runs on the
nodes asked for (a GPU node), the servers on N nodes of their own (CPU
nodes, `--server-partition`), each listening on its node's address with a
token the job makes; PSANA_IPC_ADDRESS then lists every server, separated
by commas, and PSANA_IPC_TOKEN_FILE names the token.

The script is the bash template slurm_job.sh beside this module (package
data, checked by shellcheck in the tests); this module only fills in the
job's #SBATCH header and settings.
"""
import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence

from psana_ipc.cli_help import HelpFormatter, epilog

from .preemption import RESUME_EXIT, WARNING_SIGNAL


@dataclass(frozen=True)
class Facility:
    """What a facility's jobs get unless told otherwise."""
    psconda: str  # sourcing it activates the facility's current psana environment
    partition: str
    account: Optional[str] = None


_LCLS_CDS = Facility("/cds/sw/ds/ana/conda1/manage/bin/psconda.sh", "ffbh3q")
FACILITIES: Dict[str, Facility] = {
    "S3DF": Facility("/sdf/group/lcls/ds/ana/sw/conda1/manage/bin/psconda.sh", "milano", "lcls"),
    "SLAC": _LCLS_CDS,
    "SRCF_FFB": _LCLS_CDS,
}
_DESCRIPTION = __doc__.split("\n\n")[0]
# The launcher owns the server's address and readiness; letting a user set them would break both.
_RESERVED_SERVER_OPTIONS = ("--host", "--port", "--unix", "--ready-file")
TEMPLATE = "slurm_job.sh"
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


@dataclass
class JobSpec:
    """A psana-ipc batch job. `server_env` and `client_env` are bash lines that
    activate each environment ("" = the environment the job was submitted from)."""
    command: List[str]
    job_name: str = "psana-ipc"
    log_dir: str = "."
    partition: Optional[str] = None
    account: Optional[str] = None
    reservation: Optional[str] = None
    nodes: int = 1
    ntasks: int = 1
    cpus_per_task: int = 1
    gpus: Optional[str] = None
    time: str = "01:00:00"
    mem: Optional[str] = "0"  # the btx header asks for the whole node's memory...
    exclusive: bool = True  # ...and the whole node
    server_env: str = ""
    client_env: str = ""
    server_args: List[str] = field(default_factory=list)
    ready_timeout: int = 300  # seconds for every server to accept; psana set-up can be slow
    stop_timeout: int = 5  # seconds for each stop step; three steps fit SLURM's 30 s KillWait
    requeue: bool = False  # requeue on preemption, and when the client exits RESUME_EXIT
    warn_before: Optional[int] = None  # seconds before the time limit the client is signalled
    server_nodes: int = 0  # > 0: servers on this many nodes of their own (a heterogeneous job)
    server_partition: Optional[str] = None  # theirs (default: the client's)


def activation(env: Optional[str]) -> str:
    """The bash line that activates `env`: an activation script to source, a
    venv or conda environment directory, or (anything with a space) a command."""
    if not env:
        return ""
    if any(c.isspace() for c in env):
        return env
    path = os.path.abspath(os.path.expanduser(env))
    venv_activate = os.path.join(path, "bin", "activate")
    if os.path.isfile(path):
        return f"source {shlex.quote(path)}"
    if os.path.isfile(venv_activate):
        return f"source {shlex.quote(venv_activate)}"
    if os.path.isdir(os.path.join(path, "conda-meta")):
        hook = 'eval "$("${CONDA_EXE:-conda}" shell.bash hook)"'
        return f"{hook} && conda activate {shlex.quote(path)}"
    raise ValueError(f"environment {env!r} is not an activation script, a venv, a conda "
                     f"environment or a command")


def sbatch_options(spec: JobSpec) -> List[str]:
    """The #SBATCH options of the job, in the btx JobScheduler's order; with
    servers on nodes of their own, a second component (`hetjob`) for them."""
    logs = os.path.join(os.path.abspath(spec.log_dir), spec.job_name)
    options = [f"--partition={spec.partition}" if spec.partition else None,
               f"--job-name={spec.job_name}",
               f"--output={logs}-%j.out",
               f"--error={logs}-%j.err",
               f"--nodes={spec.nodes}",
               f"--ntasks={spec.ntasks}",
               f"--cpus-per-task={spec.cpus_per_task}",
               f"--gpus={spec.gpus}" if spec.gpus else None] + _shared(spec) + [
               "--requeue" if spec.requeue else None,
               f"--signal=B:{WARNING_SIGNAL.name[3:]}@{spec.warn_before}"
               if spec.warn_before is not None else None]
    if spec.server_nodes:
        partition = spec.server_partition or spec.partition
        options += ["hetjob", f"--partition={partition}" if partition else None,
                    f"--nodes={spec.server_nodes}", f"--ntasks={spec.server_nodes}",
                    "--ntasks-per-node=1"] + _shared(spec)
    return [option for option in options if option is not None]


def _shared(spec: JobSpec) -> List[Optional[str]]:
    """The options each component of the job takes."""
    return [f"--time={spec.time}",
            f"--mem={spec.mem}" if spec.mem else None,
            "--exclusive" if spec.exclusive else None,
            f"--account={spec.account}" if spec.account else None,
            f"--reservation={spec.reservation}" if spec.reservation else None]


def check(spec: JobSpec) -> None:
    """Raise ValueError for a job SLURM or the script could not run as meant."""
    if not spec.command:
        raise ValueError("no client command (give it after --)")
    if not 1 <= spec.nodes <= spec.ntasks:
        raise ValueError(f"need 1 <= nodes <= ntasks, got {spec.nodes} nodes, {spec.ntasks} tasks")
    if spec.cpus_per_task < 1 or spec.ready_timeout < 1 or spec.stop_timeout < 1:
        raise ValueError("cpus-per-task, ready-timeout and stop-timeout must be positive")
    if spec.warn_before is not None and not 1 <= spec.warn_before <= 65535:
        raise ValueError("--warn-before takes seconds from 1 to 65535 (SLURM's limit)")
    if spec.server_nodes < 0:
        raise ValueError("server-nodes must be 0 (a server on each client node) or more")
    for option in sbatch_options(spec):
        if any(c.isspace() for c in option):
            raise ValueError(f"#SBATCH {option!r}: values cannot contain spaces")
    for arg in spec.server_args:
        name = arg.split("=", 1)[0]  # iserver also takes unambiguous prefixes, e.g. --un
        if len(name) > 2 and any(o.startswith(name) for o in _RESERVED_SERVER_OPTIONS):
            raise ValueError(f"server option {arg!r}: the launcher sets "
                             f"{', '.join(_RESERVED_SERVER_OPTIONS)}")


def _words(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def job_template() -> str:
    """The job script with @NAME@ placeholders (slurm_job.sh, shipped in the package)."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def render_script(spec: JobSpec) -> str:
    """The job script: the template with the job's #SBATCH header and settings.

    Every value is made safe for where it stands before it goes in (words
    shell-quoted, integers as integers), in one pass, so a value is never read
    as a placeholder or as shell syntax."""
    check(spec)
    values = {
        "SBATCH_OPTIONS": "\n".join(f"#SBATCH {option}" for option in sbatch_options(spec)),
        "SERVER_ENV": shlex.quote(spec.server_env),
        "CLIENT_ENV": shlex.quote(spec.client_env),
        "SERVER_ARGS": _words(spec.server_args),
        "CLIENT": _words(spec.command),
        "LOG_DIR": shlex.quote(os.path.abspath(spec.log_dir)),
        "READY_TIMEOUT": str(int(spec.ready_timeout)),
        "STOP_TIMEOUT": str(int(spec.stop_timeout)),
        "REQUEUE": "1" if spec.requeue else "0",
        "RESUME_EXIT": str(RESUME_EXIT),
        "WARNING_SIGNAL": WARNING_SIGNAL.name[3:],
        "SERVER_NODES": str(int(spec.server_nodes)),
    }
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], job_template())


def submit(path: str, wait: bool = True, log_dir: Optional[str] = None,
           say: Callable[[str], None] = lambda line: None) -> int:
    """sbatch the script; with `wait`, block until the job ends (`sbatch -W`) and
    return its exit code, else return sbatch's. While it waits, `say` hears the
    job id, each change of its state, and each server's ready file appearing
    under `log_dir` (the job's LOG_DIR)."""
    if not wait:
        return subprocess.run(["sbatch", path]).returncode
    # sbatch prints the job id before it waits, but into a pipe only at exit unless
    # its stdout is line-buffered
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    proc = subprocess.Popen(line_buffered + ["sbatch", "-W", "--parsable", path],
                            stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id:
        say(f"submitted job {job_id}; waiting for it to end")
        _watch(proc, job_id, log_dir, say)
    proc.wait()
    proc.stdout.close()
    if job_id:
        say(f"job {job_id} ended with exit code {proc.returncode}")
    return proc.returncode


def _watch(proc: subprocess.Popen, job_id: str, log_dir: Optional[str],
           say: Callable[[str], None]) -> None:
    """Report the job's state and its servers' readiness until sbatch -W returns."""
    state, ready = "", set()
    while True:
        try:
            proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            pass
        now = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %R"], capture_output=True,
                             text=True).stdout.strip()
        if now and now != state:
            state = now
            say(f"job {job_id}: {now}")
        if log_dir:
            found = set(glob.glob(os.path.join(log_dir, f"psana-ipc-{job_id}", "ready-*.json")))
            for path in sorted(found - ready):
                say(f"job {job_id}: server ready on {os.path.basename(path)[6:-5]}")
            ready |= found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    facility = os.environ.get("FACILITY")
    parser.add_argument("--facility", choices=sorted(FACILITIES),
                        default=facility if facility in FACILITIES else None,
                        help="preset partition, account and psana environment "
                             "(default: $FACILITY when it names one)")
    slurm = parser.add_argument_group("SLURM resources")
    slurm.add_argument("-p", "--partition", "--queue", help="default: the facility's")
    slurm.add_argument("-A", "--account", help="default: the facility's")
    slurm.add_argument("--reservation", help="a SLURM reservation to run in")
    slurm.add_argument("-N", "--nodes", type=int, default=1, help="one server per node")
    slurm.add_argument("-n", "--ntasks", type=int, default=1, help="one client per task")
    slurm.add_argument("-c", "--cpus-per-task", type=int, default=1, help="CPUs of each client")
    slurm.add_argument("--gpus", help="e.g. 4 or a100:4")
    slurm.add_argument("-t", "--time", default="01:00:00", help="wall-clock limit")
    slurm.add_argument("-J", "--job-name", default="psana-ipc", help="also names the script")
    slurm.add_argument("--mem", default="0", help="'' for the partition's default "
                                                  "(default: 0, the whole node's)")
    slurm.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=True,
                       help="the whole node for the job")
    slurm.add_argument("--log-dir", default=".", help="job logs, server logs and ready files; "
                                                      "must be seen from every node")
    slurm.add_argument("--requeue", action="store_true",
                       help=f"SLURM may requeue the job when preempted; the job also requeues "
                            f"itself when the client exits {RESUME_EXIT} (checkpointed, to be "
                            f"resumed)")
    slurm.add_argument("--warn-before", type=int, metavar="S",
                       help=f"send the client SIG{WARNING_SIGNAL.name[3:]} S seconds before the "
                            f"time limit, to checkpoint (psana_ipc.client.preemption)")
    envs = parser.add_argument_group(
        "environments", "an activation script, a venv or conda environment directory, or a "
                        "command such as 'source ~/miniforge3/bin/activate torch' "
                        "(default: the environment the job is submitted from)")
    envs.add_argument("--server-env", help="where iserver runs (default: the facility's psana)")
    envs.add_argument("--client-env", help="where the client command and psana-ipc run")
    server = parser.add_argument_group("server")
    server.add_argument("--server-args", default="", metavar="'OPTIONS'",
                        help="iserver options, e.g. --server-args='--source psana2 --workers 4'")
    server.add_argument("--server-nodes", type=int, default=0, metavar="N",
                        help="run the servers on N nodes of their own (a heterogeneous job: "
                             "CPU nodes serving, the client's nodes training), over TCP with a "
                             "token; default 0: a server on each of the client's nodes")
    server.add_argument("--server-partition", metavar="P",
                        help="the servers' partition with --server-nodes (default: the "
                             "facility's, else the client's)")
    server.add_argument("--ready-timeout", type=int, default=300, metavar="S",
                        help="seconds every server has to accept")
    server.add_argument("--stop-timeout", type=int, default=5, metavar="S",
                        help="seconds for each step of stopping a server")
    out = parser.add_argument_group("output (default: print the script)")
    out.add_argument("--script", metavar="PATH", help="write the job script here")
    out.add_argument("--submit", action="store_true",
                     help="submit it (to --script or LOG_DIR/JOB_NAME.sh), wait, exit with "
                          "the job's exit code")
    out.add_argument("--no-wait", action="store_true", help="with --submit: do not wait")
    parser.add_argument("client_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the client command, run on every task")


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `psana-ipc slurm` on the psana-ipc command line."""
    parser = subparsers.add_parser(
        "slurm", help="run a client command in a SLURM job next to its own iserver",
        description=_DESCRIPTION, formatter_class=HelpFormatter,
        epilog=epilog(["psana-ipc slurm --facility S3DF --server-args='--source psana2' --submit \\\n"
                       "    -- python train.py --exp xpptut15 --run 14",
                       "psana-ipc slurm -N 2 -n 8 --script job.sh -- python feed.py",
                       "psana-ipc slurm -t 04:00:00 --requeue --warn-before 300 --submit \\\n"
                       "    -- python train.py --checkpoint ckpt.pt ...",
                       "psana-ipc slurm --facility S3DF -p ampere --gpus 1 --server-nodes 2 \\\n"
                       "    --server-args='--source psana2 --workers 100' --submit \\\n"
                       "    -- python train.py"]))
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    preset = FACILITIES.get(args.facility)
    command = args.client_command
    if command[:1] == ["--"]:
        command = command[1:]
    if args.server_env or not preset:
        server_env = activation(args.server_env)
    else:  # a facility path, not necessarily visible from where the script is written
        server_env = f"source {shlex.quote(preset.psconda)}"
    return JobSpec(command=command, job_name=args.job_name, log_dir=args.log_dir,
                   partition=args.partition or (preset.partition if preset else None),
                   account=args.account or (preset.account if preset else None),
                   reservation=args.reservation, nodes=args.nodes, ntasks=args.ntasks,
                   cpus_per_task=args.cpus_per_task, gpus=args.gpus, time=args.time,
                   mem=args.mem, exclusive=args.exclusive, server_env=server_env,
                   client_env=activation(args.client_env),
                   server_args=shlex.split(args.server_args),
                   ready_timeout=args.ready_timeout, stop_timeout=args.stop_timeout,
                   requeue=args.requeue, warn_before=args.warn_before,
                   server_nodes=args.server_nodes,
                   server_partition=args.server_partition
                   or (preset.partition if preset and args.server_nodes else None))


def run(args: argparse.Namespace) -> int:
    """Print, write or submit the job script; the exit code is the job's with --submit."""
    try:
        spec = spec_from_args(args)
        text = render_script(spec)
    except ValueError as e:
        print(f"psana-ipc slurm: {e}", file=sys.stderr)
        return 2
    if not (args.script or args.submit):
        sys.stdout.write(text)
        return 0
    os.makedirs(spec.log_dir, exist_ok=True)
    path = args.script or os.path.join(spec.log_dir, f"{spec.job_name}.sh")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    print(f"psana-ipc slurm: wrote {path}", file=sys.stderr)
    if not args.submit:
        return 0
    try:
        return submit(path, wait=not args.no_wait, log_dir=spec.log_dir,
                      say=lambda line: print(f"psana-ipc slurm: {line}", file=sys.stderr,
                                             flush=True))
    except FileNotFoundError:
        print("psana-ipc slurm: no sbatch here; submit from a SLURM login node", file=sys.stderr)
        return 127


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="psana-ipc slurm", description=_DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
