"""A throw-away single-node Slurm cluster for tests: private config, loopback only, torn down without leftovers.

    from slurm_cluster import SlurmCluster, require_slurm

    require_slurm()                      # skip when Slurm is missing; under CI=true, fail
    with SlurmCluster() as cluster:
        job_id = cluster.submit("--job-name", "runpack", "--wrap", "sleep 60")
        cluster.jobs()                   # [SlurmJob(id='1', name='runpack', state='RUNNING', ...)]

or one cluster per test module: ``from slurm_cluster import slurm_cluster`` and use that fixture.

Everything lives in a temporary folder: slurm.conf, the controller's state, slurmd's spool, the pid
and log files. The daemons are slurmctld and slurmd from Debian's packages (Slurm 22.05 here), run in
the foreground as children of the test process, with AuthType=auth/none and CredType=cred/none (no
munge), SlurmUser=root, on 127.0.0.1 and on free ports. The one node advertises 8 CPUs whatever the
machine has (SlurmdParameters=config_overrides), so several 1-CPU jobs run at once on 2 cores.

Every process of a cluster carries RUNPACK_TEST_SLURM=<a uuid of that cluster> in its environment:
the daemons, slurmstepd (which slurmd detaches, so it is no child of ours), and the jobs and other
processes started with ``cluster.env``. Teardown ends whatever still carries it, and its descendants,
so a cluster never outlives its ``with`` block, even when a test fails or a daemon was killed.

shared/slurm-testing.md says why each setting is what it is. Standard library and pytest only.
"""

import atexit
import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

# ---- Settings ---------------------------------------------------------------

INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge"
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
SBIN_FOLDERS = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # where the daemons are, even when PATH leaves them out

TAG_VARIABLE = "RUNPACK_TEST_SLURM"
ADVERTISED_CPUS = 8
PARTITIONS = ("debug", "batch")  # the first is the default partition
KILL_WAIT_S = 5                  # scancel's SIGTERM, then SIGKILL this much later
MIN_JOB_AGE_S = 10               # ended jobs stay in squeue about this long (the purge runs now and then)

START_TIMEOUT_S = 30             # slurmctld answering ping and the node idle
CLIENT_TIMEOUT_S = 30            # one client command (sbatch, squeue, ...)
STOP_TIMEOUT_S = 10              # a daemon's exit after SIGTERM, before SIGKILL
JOBS_END_TIMEOUT_S = KILL_WAIT_S + 5  # at teardown, cancelled jobs leaving
POLL_S = 0.1

SlurmJob = collections.namedtuple("SlurmJob", "id name state partition reason comment")
SlurmJob.__doc__ = """One job as squeue lists it: all text; ``comment`` is None when the job has none."""

# squeue's states of a job that is over; every other state (PENDING, RUNNING, COMPLETING, ...) is active.
ENDED_STATES = frozenset(("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"))

FIELD_SEPARATOR = "\x1f"  # ASCII unit separator: in no job name or comment that a test gives
SQUEUE_FORMAT = FIELD_SEPARATOR.join(("%i", "%j", "%T", "%P", "%r", "%k"))  # SlurmJob's fields, in order


class SlurmClusterError(RuntimeError):
    """The cluster did not start or a client command failed: the message says which, with the logs' tails."""


# ---- Is Slurm here? ---------------------------------------------------------

def find_program(name):
    """The path of Slurm's ``name`` on PATH or in an sbin folder, or None."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(SBIN_FOLDERS)))


def slurm_available():
    """(True, "") when a cluster can start here, else (False, one line saying why)."""
    for name in DAEMONS + CLIENTS:
        if find_program(name) is None:
            return False, "%s not installed (%s)" % (name, INSTALL_HINT)
    if os.geteuid() != 0:
        return False, "the test Slurm cluster runs its daemons as root (SlurmUser=root); running as uid %d" % os.geteuid()
    return True, ""


def require_slurm():
    """Skip the calling test (or module, at import) when Slurm is missing; with CI=true, fail instead.

    CI installs Slurm in .ci/run, so there a missing Slurm is a broken install, not a reason to skip."""
    available, why = slurm_available()
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true and Slurm is missing: %s" % why, pytrace=False)
    pytest.skip(why, allow_module_level=True)


# ---- Processes, by /proc ----------------------------------------------------

def process_state(pid):
    """The state letter of ``pid`` in /proc (R, S, Z, ...), or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return stream.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_alive(pid):
    """True while ``pid`` runs. A zombie counts as gone: PID 1 here reaps only every few seconds."""
    return process_state(pid) not in (None, "Z")


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return int(stream.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cluster_processes(tag):
    """The live pids whose environment holds ``TAG_VARIABLE=tag``, and their descendants (a job
    submitted with --export=NONE has no tag, but its slurmstepd has); never this process or its ancestors."""
    needle = ("%s=%s" % (TAG_VARIABLE, tag)).encode()
    parents, tagged = {}, set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or not process_alive(int(name)):
            continue
        parents[int(name)] = parent_of(int(name))
        try:
            with open("/proc/%s/environ" % name, "rb") as stream:
                if needle in stream.read().split(b"\0"):
                    tagged.add(int(name))
        except OSError:  # gone meanwhile
            continue
    found, generation = set(), tagged
    while generation:
        found |= generation
        generation = {pid for pid, parent in parents.items() if parent in generation} - found
    pid = os.getpid()
    while pid:
        found.discard(pid)
        pid = parents.get(pid) or parent_of(pid)
    return sorted(found)


def wait_until_gone(pids, timeout):
    """Wait until none of ``pids`` is alive; the ones still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(POLL_S / 2)


def free_loopback_ports(count):
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as stream:
            return "".join(stream.readlines()[-lines:])
    except OSError as exc:
        return "(cannot read %s: %s)\n" % (path, exc)


# ---- The cluster ------------------------------------------------------------

class SlurmCluster:
    """slurmctld and slurmd on 127.0.0.1 with a private slurm.conf; a context manager.

    ``env``: os.environ plus SLURM_CONF and the cluster's tag, for every client command and for the
    processes a test starts (sbatch passes it on to the jobs). ``run(*command)`` runs a client
    command with it. Leaving the ``with`` block cancels every job, stops both daemons and ends any
    process still carrying the tag."""

    def __init__(self, partitions=PARTITIONS, cpus=ADVERTISED_CPUS, min_job_age=MIN_JOB_AGE_S,
                 start_timeout=START_TIMEOUT_S):
        self.partitions, self.cpus, self.min_job_age = tuple(partitions), cpus, min_job_age
        self.start_timeout = start_timeout
        self.tag = uuid.uuid4().hex
        self.host = socket.gethostname().split(".")[0]
        self.directory = None
        self.conf_path = None
        self.env = None
        self.daemons = {}  # name: Popen
        self.start_seconds = self.stop_seconds = None

    # -- starting --

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Write the config, start both daemons and wait until the node is idle; on failure, stop and raise."""
        available, why = slurm_available()
        if not available:
            raise SlurmClusterError(why)
        started = time.monotonic()
        self.directory = tempfile.mkdtemp(prefix="runpack-slurm-")  # short: slurmd's sockets go in its spool
        self.conf_path = os.path.join(self.directory, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf_path, **{TAG_VARIABLE: self.tag})
        atexit.register(self.stop)
        try:
            self._write_config()
            self._start_daemon("slurmctld", "-D", "-f", self.conf_path)
            self._start_daemon("slurmd", "-D", "-f", self.conf_path, "-N", self.host)
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _write_config(self):
        for folder in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.directory, folder))
        ctld_port, slurmd_port = free_loopback_ports(2)
        path = lambda *parts: os.path.join(self.directory, *parts)  # noqa: E731
        settings = [
            ("ClusterName", "runpacktest"),
            ("SlurmctldHost", "%s(127.0.0.1)" % self.host),
            ("SlurmctldPort", ctld_port),
            ("SlurmdPort", slurmd_port),
            ("SlurmUser", "root"),
            ("SlurmdUser", "root"),
            ("AuthType", "auth/none"),
            ("CredType", "cred/none"),
            ("StateSaveLocation", path("state")),
            ("SlurmdSpoolDir", path("spool")),
            ("SlurmctldPidFile", path("slurmctld.pid")),
            ("SlurmdPidFile", path("slurmd.pid")),
            ("SlurmctldLogFile", path("log", "slurmctld.log")),
            ("SlurmdLogFile", path("log", "slurmd.log")),
            ("SlurmctldDebug", "info"),
            ("SlurmdDebug", "info"),
            ("ProctrackType", "proctrack/linuxproc"),
            ("TaskPlugin", "task/none"),
            ("SelectType", "select/cons_tres"),
            ("SelectTypeParameters", "CR_Core"),
            ("SlurmdParameters", "config_overrides"),
            ("AccountingStorageType", "accounting_storage/none"),
            ("JobAcctGatherType", "jobacct_gather/none"),
            ("JobCompType", "jobcomp/none"),
            ("MpiDefault", "none"),
            ("MailProg", "/bin/true"),
            ("KillWait", KILL_WAIT_S),
            ("MinJobAge", self.min_job_age),
            ("ReturnToService", 2),
            ("InactiveLimit", 0),
            ("SchedulerType", "sched/backfill"),
            # Start each job when it is submitted, and look at pending ones again every few seconds.
            ("SchedulerParameters", "batch_sched_delay=0,sched_interval=5,bf_interval=1"),
        ]
        lines = ["# Written by tests/slurm_cluster.py for one test cluster (tag %s)." % self.tag]
        lines += ["%s=%s" % setting for setting in settings]
        lines.append("NodeName=%s NodeAddr=127.0.0.1 CPUs=%d Boards=1 SocketsPerBoard=1 CoresPerSocket=%d "
                     "ThreadsPerCore=1 RealMemory=%d State=UNKNOWN"
                     % (self.host, self.cpus, self.cpus, self._real_memory_mib() // 2))
        for index, name in enumerate(self.partitions):
            lines.append("PartitionName=%s Nodes=ALL Default=%s MaxTime=INFINITE State=UP"
                         % (name, "YES" if index == 0 else "NO"))
        with open(self.conf_path, "w") as stream:
            stream.write("\n".join(lines) + "\n")

    def _real_memory_mib(self):
        """RealMemory as `slurmd -C` measures it here."""
        result = subprocess.run([find_program("slurmd"), "-C"], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True, timeout=CLIENT_TIMEOUT_S)
        for word in result.stdout.split():
            if word.startswith("RealMemory="):
                return int(word.split("=", 1)[1])
        raise SlurmClusterError("`slurmd -C` printed no RealMemory (exit %d):\n%s" % (result.returncode, result.stdout))

    def _start_daemon(self, name, *arguments):
        with open(os.path.join(self.directory, "log", name + ".out"), "wb") as output:
            self.daemons[name] = subprocess.Popen(
                [find_program(name)] + list(arguments), env=self.env, cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.start_timeout
        waiting_for = "slurmctld to answer `scontrol ping`"
        while time.monotonic() < deadline:
            for name, process in self.daemons.items():
                if process.poll() is not None:
                    raise SlurmClusterError("%s exited with %s while starting\n%s"
                                            % (name, process.returncode, self.logs()))
            if "UP" in self.run("scontrol", "ping", check=False).stdout:
                waiting_for = "the node to be idle in `sinfo`"
                states = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
                if states and all(state == "idle" for state in states):
                    return
            time.sleep(POLL_S)
        raise SlurmClusterError("gave up after %ss waiting for %s\n%s" % (self.start_timeout, waiting_for, self.logs()))

    # -- using --

    def run(self, *command, env=None, check=True, timeout=CLIENT_TIMEOUT_S, cwd=None):
        """A client command (``"squeue", "-h"``) with ``env`` (default: the cluster's), in the
        cluster's folder; the CompletedProcess, text. ``check``: raise SlurmClusterError on failure."""
        result = subprocess.run(list(command), env=self.env if env is None else env, cwd=cwd or self.directory,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmClusterError("`%s` exited with %d: %s" % (" ".join(command), result.returncode,
                                                                  result.stderr.strip() or result.stdout.strip()))
        return result

    def submit(self, *sbatch_arguments, env=None):
        """sbatch with these arguments (``"--wrap", "sleep 60"``); the new job's id."""
        return self.run("sbatch", "--parsable", *sbatch_arguments, env=env).stdout.strip().split(";")[0]

    def jobs(self):
        """Every job squeue still knows, ended ones too (for about MinJobAge seconds), as SlurmJobs."""
        output = self.run("squeue", "--states=all", "--noheader", "--format=" + SQUEUE_FORMAT).stdout
        jobs = []
        for line in output.splitlines():
            fields = line.split(FIELD_SEPARATOR, len(SlurmJob._fields) - 1)
            if len(fields) != len(SlurmJob._fields):
                raise SlurmClusterError("cannot read this line of squeue: %r" % line)
            job = SlurmJob(*fields)
            jobs.append(job._replace(comment=None if job.comment == "(null)" else job.comment))
        return jobs

    def active_jobs(self):
        """The jobs not yet over: pending, running, completing and the like."""
        return [job for job in self.jobs() if job.state not in ENDED_STATES]

    def job(self, job_id):
        """The SlurmJob of ``job_id``, or None once squeue has forgotten it."""
        return next((job for job in self.jobs() if job.id == str(job_id)), None)

    def wait_for_state(self, job_id, states, timeout=30):
        """Wait until job ``job_id`` is in one of ``states`` (a name or several); its SlurmJob."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job is not None and job.state in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError("job %s is %s, not %s, after %ss" % (job_id, job and job.state, "/".join(states), timeout))
            time.sleep(POLL_S)

    def cancel_all(self):
        """scancel every job that is not over yet."""
        ids = [job.id for job in self.active_jobs()]
        if ids:
            self.run("scancel", *ids, check=False)

    def wait_for_no_jobs(self, timeout=30):
        """Wait until no job is pending, running or completing (ended jobs may still be listed);
        AssertionError naming the jobs left after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.active_jobs()
            if not active:
                return
            if time.monotonic() > deadline:
                raise AssertionError("jobs still active after %ss: %s" % (timeout, active))
            time.sleep(POLL_S)

    def logs(self):
        """The last lines of the daemons' logs, for a failure message."""
        folder = os.path.join(self.directory, "log")
        return "".join("--- %s:\n%s" % (name, tail(os.path.join(folder, name)))
                       for name in sorted(os.listdir(folder)))

    # -- stopping --

    def stop(self):
        """Cancel the jobs, stop the daemons, end every process with the tag, remove the folder. Idempotent."""
        if self.directory is None:
            return
        started = time.monotonic()
        atexit.unregister(self.stop)
        try:
            if all(process.poll() is None for process in self.daemons.values()) and len(self.daemons) == 2:
                try:
                    self.cancel_all()
                    self.wait_for_no_jobs(JOBS_END_TIMEOUT_S)
                except (AssertionError, SlurmClusterError, OSError, subprocess.SubprocessError):
                    pass  # whatever is left is killed below
            for name in reversed(list(self.daemons)):  # slurmd first, then slurmctld
                self._stop_daemon(self.daemons[name])
            self._end_leftovers()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self.stop_seconds = time.monotonic() - started

    @staticmethod
    def _stop_daemon(process):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _end_leftovers(self):
        """SIGKILL the cluster's processes still alive (slurmstepd, jobs, their children), until none is."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            leftovers = cluster_processes(self.tag)
            if not leftovers:
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError("processes of the test Slurm cluster outlived SIGKILL: %s" % leftovers)
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_until_gone(leftovers, 2)


def leftover_processes(tag):
    """The live processes of the cluster tagged ``tag``, as (pid, comm): empty after its teardown."""
    found = []
    for pid in cluster_processes(tag):
        try:
            with open("/proc/%d/comm" % pid) as stream:
                found.append((pid, stream.read().strip()))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def slurm_cluster():
    """One cluster for a test module: ``from slurm_cluster import slurm_cluster`` in it, then use the
    fixture. Skips (under CI=true, fails) when Slurm is missing."""
    require_slurm()
    with SlurmCluster() as cluster:
        yield cluster
