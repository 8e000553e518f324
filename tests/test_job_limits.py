"""What a job may use: the network guard and the memory limit of every job process.

Addresses outside loopback are only ever values here, checked against the policy with a
stand-in resolver. End to end, 127.0.0.1 (and ::1) stands for the machine and the networks
it sits in, which jobs may not reach, and 127.0.0.2 for a network the operator allowed with
--allow-job-network 127.0.0.2/32: the real CLI, through `runner` against the fake worker and
through `run`, with web servers on loopback that record every connection they accept."""

import errno
import http.server
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.parse

import pytest

from conftest import RUNNER_KEY, TESTS, run_cli
from runpack_runner import (ANY_NETWORK, DEFAULT_MEMORY_FLOOR, THREAD_POOL_VARIABLES, JobLimits, JobNetworkDenied,
                            NetworkGuard, NetworkPolicy, _cgroup_limits, _parse_networks, _parse_size, _usable_cpus,
                            available_memory, data_limit_counts_mmap, describe_job_limits, describe_size,
                            machine_addresses)

HANDLERS = ("--handlers", os.path.join(TESTS, "job_types_for_limits.py"))
ALLOW_SECOND_LOOPBACK = ("--allow-job-network", "127.0.0.2/32")
DENIAL = "{host} resolves to {address}, which jobs on this runner may not reach (allow it with --allow-job-network)"
MIB = 1 << 20
TOO_LARGE_TO_READ_AS_A_FLOAT = "9" * 400 + "G"


def no_own_addresses():
    return []


def policy(allowed="", own=()):
    """The policy of --allow-job-network ``allowed`` on a machine whose own addresses are ``own``."""
    return NetworkPolicy(_parse_networks(allowed), own_addresses=lambda: [ipaddress.ip_network(a) for a in own])


def permitted(address, allowed="", own=()):
    return policy(allowed, own).permits(ipaddress.ip_address(address))


class StandInResolver:
    """getaddrinfo for names that are only values: each name answers the addresses listed
    for it, one per call, the last one again once the list is used up."""

    def __init__(self, **answers):
        self.answers = {}
        for name, addresses in answers.items():
            self.add(name.replace("_", "."), *([addresses] if isinstance(addresses, str) else addresses))
        self.asked = []

    def add(self, name, *addresses):
        self.answers[name] = list(addresses)
        return self

    def __call__(self, host, port, family=0, kind=0, *rest):
        self.asked.append(host)
        queue = self.answers[host]
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        if ":" in address:
            return [(socket.AF_INET6, kind, socket.IPPROTO_TCP, "", (address, port, 0, 0))]
        return [(socket.AF_INET, kind, socket.IPPROTO_TCP, "", (address, port))]


def guard(resolver, allowed=""):
    return NetworkGuard(policy(allowed), resolve=resolver)


# ---- Which addresses a job may reach (values only) ----------------------------------------


@pytest.mark.parametrize("address", [
    "10.0.0.1", "10.255.255.254", "172.16.0.1", "172.31.255.255", "192.168.1.1",  # private (RFC 1918)
    "169.254.1.1", "169.254.169.254",  # link-local, the cloud metadata service
    "168.63.129.16",  # Azure's host services
    "100.64.0.1", "100.127.255.254",  # carrier-grade NAT
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "255.255.255.255", "240.0.0.1",
    "224.0.0.1", "239.255.255.250",  # multicast
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1",  # documentation, benchmarking
    "192.88.99.1",  # the old 6to4 relays
    "::1", "::", "fd00::1", "fc00::1", "fe80::1", "fec0::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",  # NAT64 of 127.0.0.1, of the metadata service; local NAT64
    "2002:7f00:1::1", "2002:a00:1::1",  # 6to4 of 127.0.0.1, of 10.0.0.1
    "::ffff:0:7f00:1", "::ffff:0:a00:1",  # IPv4-translated (SIIT) 127.0.0.1, 10.0.0.1
    "2001:db8::1", "3fff::1", "5f00::1",  # documentation; segment routing
    "4000::1", "100:0:0:1::1", "::1:7f00:1", "::ffff:1:0:0:0", "8000::1",  # IPv6 outside global unicast
])
def test_the_machine_its_networks_and_addresses_that_reach_no_one_in_particular_are_denied(address):
    assert not permitted(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::5db8:d822",
                                     "::ffff:93.184.216.34", "2002:5db8:d822::1", "::ffff:0:5db8:d822"])
def test_public_addresses_are_permitted_in_every_form(address):
    assert permitted(address)


@pytest.mark.parametrize("address, allowed", [
    ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("64:ff9b::a01:203", True),
    ("10.2.0.1", False), ("::ffff:10.2.0.1", False), ("127.0.0.1", False)])
def test_an_allowed_network_lets_its_addresses_through_in_every_form_and_no_other(address, allowed):
    assert permitted(address, allowed="10.1.0.0/16") is allowed


def test_an_allowed_ipv6_network_lets_unique_local_addresses_through():
    assert permitted("fd12:3456::7", allowed="fd12:3456::/32")
    assert not permitted("fd12:3457::7", allowed="fd12:3456::/32")


def test_the_machines_own_public_address_is_denied_unless_allowed():
    own = ("34.120.0.7/32", "2a01:4f8::7/128")
    assert not permitted("34.120.0.7", own=own)
    assert not permitted("::ffff:34.120.0.7", own=own)
    assert not permitted("2a01:4f8::7", own=own)
    assert permitted("34.120.0.8", own=own), "a neighbour on the internet is not the machine"
    assert permitted("34.120.0.7", allowed="34.120.0.7", own=own)


def test_any_permits_every_address_and_describes_no_guard():
    anything = NetworkPolicy(_parse_networks("any"), own_addresses=no_own_addresses)
    assert all(anything.permits(ipaddress.ip_address(a)) for a in ("127.0.0.1", "169.254.169.254", "::1"))
    assert anything.describe() == "any address (--allow-job-network any): no network guard"


# ---- The guard: names resolved once, at each connect (values only) -------------------------


def test_a_name_that_resolves_to_a_private_address_is_denied_naming_the_host_and_the_address():
    job_guard = guard(StandInResolver(intranet_example="10.0.0.5"))
    with pytest.raises(JobNetworkDenied) as denied:
        job_guard.checked(socket.AF_INET, socket.SOCK_STREAM, ("intranet.example", 80))
    assert str(denied.value) == DENIAL.format(host="intranet.example", address="10.0.0.5")
    assert job_guard.denial is denied.value, "the first denial becomes the job's error"


def test_a_name_that_resolves_to_the_metadata_service_is_denied():
    job_guard = guard(StandInResolver(metadata_example="169.254.169.254"))
    with pytest.raises(JobNetworkDenied, match="^metadata.example resolves to 169.254.169.254, "):
        job_guard.checked(socket.AF_INET, socket.SOCK_STREAM, ("metadata.example", 80))


def test_a_public_name_is_connected_to_at_exactly_the_address_that_was_checked():
    resolver = StandInResolver(data_example="93.184.216.34")
    address = guard(resolver).checked(socket.AF_INET, socket.SOCK_STREAM, ("data.example", 443))
    assert address == ("93.184.216.34", 443)
    assert resolver.asked == ["data.example"]


def test_a_name_is_resolved_again_at_each_connect_so_that_dns_rebinding_to_a_private_address_is_denied():
    resolver = StandInResolver(rebind_example=["93.184.216.34", "127.0.0.1"])
    job_guard = guard(resolver)
    assert job_guard.checked(socket.AF_INET, socket.SOCK_STREAM, ("rebind.example", 80)) == ("93.184.216.34", 80)
    with pytest.raises(JobNetworkDenied) as denied:
        job_guard.checked(socket.AF_INET, socket.SOCK_STREAM, ("rebind.example", 80))
    assert str(denied.value) == DENIAL.format(host="rebind.example", address="127.0.0.1")
    assert resolver.asked == ["rebind.example", "rebind.example"]


@pytest.mark.parametrize("spelling", ["0177.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001"])
def test_an_address_spelled_as_only_the_c_library_reads_it_is_resolved_not_trusted_to_ipaddress(spelling):
    resolver = StandInResolver().add(spelling, "127.0.0.1")
    with pytest.raises(JobNetworkDenied) as denied:
        guard(resolver).checked(socket.AF_INET, socket.SOCK_STREAM, (spelling, 80))
    assert resolver.asked == [spelling]
    assert str(denied.value) == DENIAL.format(host=spelling, address="127.0.0.1")


def test_an_address_in_standard_form_is_checked_without_a_lookup_and_used_in_its_standard_spelling():
    resolver = StandInResolver()
    job_guard = guard(resolver)
    assert (job_guard.checked(socket.AF_INET6, socket.SOCK_STREAM, ("2606:4700:0:0:0:0:0:1111", 443, 0, 0))
            == ("2606:4700::1111", 443, 0, 0))
    with pytest.raises(JobNetworkDenied) as denied:
        job_guard.checked(socket.AF_INET6, socket.SOCK_STREAM, ("0:0:0:0:0:FFFF:7F00:0001", 80, 0, 0))
    assert str(denied.value) == DENIAL.format(host="0:0:0:0:0:FFFF:7F00:0001", address="::ffff:127.0.0.1")
    assert resolver.asked == []


@pytest.mark.parametrize("host, address", [("", "0.0.0.0"), ("<broadcast>", "255.255.255.255"),
                                           (b"127.0.0.1", "127.0.0.1")])
def test_hosts_that_pythons_socket_module_reads_specially_are_checked_as_it_reads_them(host, address):
    with pytest.raises(JobNetworkDenied, match="resolves to %s, " % address.replace(".", r"\.")):
        guard(StandInResolver()).checked(socket.AF_INET, socket.SOCK_DGRAM, (host, 9))


def test_a_scoped_address_is_read_as_a_number_only_and_connected_to_as_it_was_read():
    asked = []

    def numeric_resolver(host, port, family=0, kind=0, proto=0, flags=0):
        asked.append((host, flags & socket.AI_NUMERICHOST))
        if not host.startswith("fe80::"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6, kind, 0, "", ("fe80::1%eth0", port, 0, 2))]
    job_guard = guard(numeric_resolver)
    with pytest.raises(socket.gaierror):  # not a name that a DNS server could answer with any address
        job_guard.checked(socket.AF_INET, socket.SOCK_STREAM, ("93.184.216.34%rebind.example", 80))
    with pytest.raises(JobNetworkDenied, match="^fe80::1%eth0 resolves to fe80::1, "):
        job_guard.checked(socket.AF_INET6, socket.SOCK_STREAM, ("fe80::1%eth0", 80, 0, 0))
    assert guard(numeric_resolver, allowed="fe80::/10").checked(
        socket.AF_INET6, socket.SOCK_STREAM, ("fe80::1%eth0", 80, 0, 0)) == ("fe80::1%eth0", 80, 0, 2)
    assert asked == [("93.184.216.34%rebind.example", socket.AI_NUMERICHOST),
                     ("fe80::1%eth0", socket.AI_NUMERICHOST), ("fe80::1%eth0", socket.AI_NUMERICHOST)]


def test_an_allowed_network_lets_a_name_that_resolves_into_it_through():
    resolver = StandInResolver(db_internal="10.1.4.4")
    assert guard(resolver, allowed="10.1.0.0/16").checked(socket.AF_INET, socket.SOCK_STREAM,
                                                          ("db.internal", 5432)) == ("10.1.4.4", 5432)


# ---- Settings: --allow-job-network, --job-memory-limit (values only) ------------------------


@pytest.mark.parametrize("text, networks", [
    ("10.1.0.0/16,127.0.0.2", ["10.1.0.0/16", "127.0.0.2/32"]),
    (" 10.1.0.0/16 , fd00::/8 ", ["10.1.0.0/16", "fd00::/8"]),
    ("10.1.2.3/16", ["10.1.0.0/16"]),  # an address with its prefix length names its network
    ("", []),
])
def test_allowed_networks_are_read_as_comma_separated_cidrs_or_addresses(text, networks):
    assert _parse_networks(text) == tuple(ipaddress.ip_network(network) for network in networks)


@pytest.mark.parametrize("text", ["any", "ANY", " any "])
def test_any_turns_the_network_guard_off(text):
    assert _parse_networks(text) == ANY_NETWORK


@pytest.mark.parametrize("text", ["10.0.0.0/33", "intranet.example", "10.0.0.0/8;192.168.0.0/16",
                                  "any,10.0.0.0/8", "300.1.1.1"])
def test_allowed_networks_that_are_not_cidrs_are_refused(text):
    with pytest.raises(ValueError):
        _parse_networks(text)


@pytest.mark.parametrize("text, size", [
    ("512M", 512 * MIB), ("4G", 4 << 30), ("4g", 4 << 30), ("1.5G", 1536 * MIB), ("512MiB", 512 * MIB),
    ("512MB", 512 * MIB), ("64M", 64 * MIB), ("65536K", 64 * MIB), ("1T", 1 << 40), ("0", 0)])
def test_memory_sizes_are_read_in_powers_of_1024(text, size):
    assert _parse_size(text) == size


@pytest.mark.parametrize("text", ["12", "63M", "512", "0M", "-1G", "lots", "", "4X"])
def test_memory_sizes_without_a_unit_or_under_64m_are_refused(text):
    with pytest.raises(ValueError):
        _parse_size(text)


@pytest.mark.parametrize("text", [TOO_LARGE_TO_READ_AS_A_FLOAT, "8388608T", "8388608.1T"])
def test_memory_sizes_too_large_for_setrlimit_are_refused(text):
    with pytest.raises(ValueError):
        _parse_size(text)


def test_a_size_just_under_2_63_bytes_is_accepted():
    assert _parse_size("8388607T") == (1 << 63) - (1 << 40)


@pytest.mark.parametrize("size, text", [(400 * MIB, "400 MiB"), (4 << 30, "4 GiB"), (1536 * MIB, "1.5 GiB"),
                                        (64 * MIB, "64 MiB")])
def test_sizes_are_described_in_mib_or_gib(size, text):
    assert describe_size(size) == text


def test_the_machines_own_addresses_are_read_from_the_kernel():
    own = machine_addresses()
    if not os.path.exists("/proc/net/fib_trie"):
        pytest.skip("the kernel's address table is Linux's /proc/net/fib_trie")
    assert any(ipaddress.ip_address("127.0.0.1") in network for network in own)
    assert any(ipaddress.ip_address("::1") in network for network in own) == os.path.exists("/proc/net/if_inet6")


def test_a_memory_limit_set_on_a_cgroup_above_the_runners_counts(tmp_path):
    """Slurm and systemd set the limit on the job's or the slice's cgroup, above the process's."""
    leaf = tmp_path / "job_7" / "step_0" / "task_0"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (tmp_path / "job_7" / "memory.max").write_text("%d\n" % (8 << 30))
    limits = _cgroup_limits(str(tmp_path), "/job_7/step_0/task_0", "memory.max")
    assert min(limit for limit in limits if limit) == 8 << 30


@pytest.mark.parametrize("release, counts", [("3.10.0-1160.el7.x86_64", False), ("4.6.7", False),
                                             ("4.7.0", True), ("4.18.0-553.el8_10.x86_64", True), ("6.18.1", True),
                                             ("10.0", True)])
def test_linux_counts_mmapped_memory_in_the_data_limit_from_4_7_on(release, counts):
    assert data_limit_counts_mmap(release) is counts


def test_a_memory_limit_on_a_kernel_before_4_7_is_warned_of_and_none_is_not():
    warning = (logging.WARNING, "The job memory limit cannot hold on Linux 3.10.0-1160.el7.x86_64: before 4.7, the "
                                "kernel leaves memory mapped with mmap (glibc's large allocations) out of the data "
                                "limit; limit jobs' memory with Slurm's --mem or a cgroup (systemd MemoryMax=)")
    old_kernel = "3.10.0-1160.el7.x86_64"
    assert warning in describe_job_limits(JobLimits(ANY_NETWORK, 400 * MIB), True, old_kernel)
    assert warning not in describe_job_limits(JobLimits(ANY_NETWORK, 0), True, old_kernel)
    assert logging.WARNING not in dict(describe_job_limits(JobLimits((), 400 * MIB), True, "6.18.1"))


@pytest.mark.parametrize("error", [MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")])
def test_an_allocation_that_failed_is_explained_as_the_memory_limit(error):
    try:
        try:
            raise error
        except BaseException as cause:
            raise RuntimeError("the parser gave up") from cause
    except RuntimeError as wrapped:
        assert (JobLimits(ANY_NETWORK, 400 * MIB).explain(wrapped, {})
                == "Job exceeded its memory limit of 400 MiB (--job-memory-limit)")
        assert JobLimits(ANY_NETWORK, 0).explain(wrapped, {}) is None, "without a limit it is not the limit's doing"


# ---- Loopback servers that record every connection -------------------------------------------


class PageHandler(http.server.BaseHTTPRequestHandler):
    """``/``: a page naming the server's address; ``/redirect?to=URL``: a 302 to URL."""

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = ("content of %s" % self.server.host).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class RecordingWebServer(http.server.ThreadingHTTPServer):
    """A web server on a loopback address that records the client of each connection it accepts."""

    daemon_threads = True

    def __init__(self, host):
        self.host = host
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.accepted = []
        self._accepted_lock = threading.Lock()
        super().__init__((host, 0), PageHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def url(self, path="/"):
        return "http://%s:%d%s" % ("[%s]" % self.host if ":" in self.host else self.host, self.port, path)

    def get_request(self):
        connection, client = super().get_request()
        with self._accepted_lock:
            self.accepted.append(client[:2])
        return connection, client

    def connections_so_far(self):
        """The clients of the connections made so far: the server accepts a connection of
        our own, and those queued before it are accepted before it."""
        with socket.create_connection((self.host, self.port), timeout=10) as sentinel:
            own = sentinel.getsockname()[:2]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with self._accepted_lock:
                    if own in self.accepted:
                        return self.accepted[:self.accepted.index(own)]
                time.sleep(0.02)
        raise AssertionError("the server never accepted the test's own connection")

    def close(self):
        self.shutdown()
        self.server_close()


class RecordingUdpServer:
    """A UDP socket on a loopback address whose datagrams the test reads."""

    def __init__(self, host="127.0.0.1"):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((host, 0))
        self.socket.settimeout(10)
        self.host, self.port = host, self.socket.getsockname()[1]

    def datagrams_so_far(self):
        """The datagrams sent so far: the test sends one of its own, and reads up to it."""
        sentinel = b"sentinel %d" % id(self)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(sentinel, (self.host, self.port))
        received = []
        while True:
            datagram = self.socket.recv(65536)
            if datagram == sentinel:
                return received
            received.append(datagram)

    def close(self):
        self.socket.close()


@pytest.fixture
def web_server():
    """Start a RecordingWebServer: ``web_server("127.0.0.1")``."""
    started = []

    def start(host):
        server = RecordingWebServer(host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def inside(web_server):
    """A server where jobs may not go: on 127.0.0.1, the machine itself."""
    return web_server("127.0.0.1")


@pytest.fixture
def allowed(web_server):
    """A server on 127.0.0.2, in the network the tests allow with ALLOW_SECOND_LOOPBACK."""
    return web_server("127.0.0.2")


@pytest.fixture
def inside_v6(web_server):
    try:
        return web_server("::1")
    except OSError as error:
        pytest.skip("this machine has no IPv6 loopback (::1): %s" % error)


@pytest.fixture
def udp_inside():
    server = RecordingUdpServer()
    yield server
    server.close()


# ---- Running jobs: through a runner against the fake worker, or through `run` -----------------


def run_through_runner(worker, start_runner, jobs, *flags, timeout=30):
    """Serve ``jobs`` [(job_type, params)] with one runner; (finished jobs, runner output)."""
    job_ids = [worker.add_job(job_type, params) for job_type, params in jobs]
    runner = start_runner(*(HANDLERS + flags))
    worker.wait_until(lambda: all(worker.job(j)["status"] in ("completed", "failed") for j in job_ids),
                      timeout=timeout, message="the jobs did not finish")
    assert runner.stop() == 0
    return [worker.job(job_id) for job_id in job_ids], runner.output


def run_here(job_type, params, *flags, env=None):
    """`run` one job with its parameters as --params JSON; the CompletedProcess."""
    return run_cli("run", job_type, "--params", json.dumps(params), *(HANDLERS + flags), env=env)


def error_of(result):
    """The one error line `run` ends with, without its "Error: "."""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    return last[len("Error: "):]


def loopback_spellings(port):
    """(URL, host in the message, address in the message): spellings of the machine's address."""
    localhost = socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)[0][4][0]
    return [("http://127.0.0.1:%d/" % port, "127.0.0.1", "127.0.0.1"),
            ("http://localhost:%d/" % port, "localhost", localhost),
            ("http://2130706433:%d/" % port, "2130706433", "127.0.0.1"),
            ("http://127.1:%d/" % port, "127.1", "127.0.0.1"),
            ("http://0177.0.0.1:%d/" % port, "0177.0.0.1", "127.0.0.1"),
            ("http://0x7f000001:%d/" % port, "0x7f000001", "127.0.0.1"),
            ("http://0.0.0.0:%d/" % port, "0.0.0.0", "0.0.0.0"),
            ("http://[::ffff:127.0.0.1]:%d/" % port, "::ffff:127.0.0.1", "::ffff:127.0.0.1")]


SPELLING_NAMES = ["127.0.0.1", "localhost", "decimal", "short", "octal", "hex", "0.0.0.0", "ipv4-mapped"]


# ---- The network guard end to end ------------------------------------------------------------


@pytest.mark.slow
def test_a_runners_jobs_are_denied_every_spelling_of_the_machines_address_and_it_sees_no_connection(
        worker, start_runner, inside):
    spellings = loopback_spellings(inside.port)
    finished, _ = run_through_runner(worker, start_runner, [("fetch_url", {"url": url}) for url, _, _ in spellings],
                                     *ALLOW_SECOND_LOOPBACK)
    for job, (url, host, address) in zip(finished, spellings):
        assert job["status"] == "failed", url
        assert job["error_message"] == "url: " + DENIAL.format(host=host, address=address), url
    assert inside.connections_so_far() == []


@pytest.mark.slow
@pytest.mark.parametrize("spelling", range(len(SPELLING_NAMES)), ids=SPELLING_NAMES)
def test_run_denies_every_spelling_of_the_machines_address_and_it_sees_no_connection(inside, spelling):
    url, host, address = loopback_spellings(inside.port)[spelling]
    result = run_here("fetch_url", {"url": url}, *ALLOW_SECOND_LOOPBACK)
    assert result.returncode == 1
    assert error_of(result) == "url: " + DENIAL.format(host=host, address=address)
    assert "Traceback" not in result.stderr
    assert inside.connections_so_far() == []


@pytest.mark.slow
def test_ipv6_loopback_is_denied_through_runner_and_run_and_sees_no_connection(worker, start_runner, inside_v6):
    expected = "url: " + DENIAL.format(host="::1", address="::1")
    (job,), _ = run_through_runner(worker, start_runner, [("fetch_url", {"url": inside_v6.url()})])
    assert (job["status"], job["error_message"]) == ("failed", expected)
    result = run_here("fetch_url", {"url": inside_v6.url()})
    assert (result.returncode, error_of(result)) == (1, expected)
    assert inside_v6.connections_so_far() == []


@pytest.mark.slow
def test_an_allowed_network_is_reached_and_a_redirect_from_it_to_the_machine_is_denied(
        worker, start_runner, inside, allowed):
    redirect = allowed.url("/redirect?to=" + urllib.parse.quote(inside.url("/secret")))
    (fetched, redirected), _ = run_through_runner(
        worker, start_runner, [("fetch_url", {"url": allowed.url()}), ("fetch_url", {"url": redirect})],
        *ALLOW_SECOND_LOOPBACK)
    assert (fetched["status"], fetched["output_data"]) == ("completed", {"body": "content of 127.0.0.2"})
    assert redirected["status"] == "failed"
    assert redirected["error_message"] == "url: " + DENIAL.format(host="127.0.0.1", address="127.0.0.1")
    assert inside.connections_so_far() == []
    assert len(allowed.connections_so_far()) == 2


@pytest.mark.slow
def test_run_reaches_an_allowed_network_and_is_denied_a_redirect_from_it_to_the_machine(inside, allowed):
    reached = run_here("fetch_url", {"url": allowed.url()}, *ALLOW_SECOND_LOOPBACK)
    assert reached.returncode == 0, reached.stderr
    assert '"body": "content of 127.0.0.2"' in reached.stdout
    redirect = allowed.url("/redirect?to=" + urllib.parse.quote(inside.url("/secret")))
    denied = run_here("fetch_url", {"url": redirect}, *ALLOW_SECOND_LOOPBACK)
    assert (denied.returncode, error_of(denied)) == (
        1, "url: " + DENIAL.format(host="127.0.0.1", address="127.0.0.1"))
    assert inside.connections_so_far() == []


@pytest.mark.slow
def test_a_denial_names_the_parameter_whose_url_names_the_host_else_no_parameter(inside, allowed):
    named = run_here("fetch_url", {"url": inside.url(), "mirror": allowed.url()}, *ALLOW_SECOND_LOOPBACK)
    assert error_of(named) == "url: " + DENIAL.format(host="127.0.0.1", address="127.0.0.1")
    redirect = allowed.url("/redirect?to=" + urllib.parse.quote(inside.url()))
    unnamed = run_here("fetch_url", {"url": redirect, "mirror": "http://127.0.0.3/"}, *ALLOW_SECOND_LOOPBACK)
    assert error_of(unnamed) == DENIAL.format(host="127.0.0.1", address="127.0.0.1")
    assert inside.connections_so_far() == []


@pytest.mark.slow
def test_the_machines_address_is_denied_to_raw_sockets_and_udp_as_to_urls(worker, start_runner, inside, udp_inside):
    jobs = [("connect_raw", {"host": "127.0.0.1", "port": inside.port, "how": how})
            for how in ("create_connection", "connect", "connect_ex")]
    jobs.append(("connect_raw", {"host": "127.0.0.1", "port": udp_inside.port, "how": "sendto"}))
    jobs.append(("connect_raw", {"host": "localhost", "port": inside.port, "how": "connect"}))
    finished, _ = run_through_runner(worker, start_runner, jobs)
    localhost = socket.getaddrinfo("localhost", inside.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    expected = [DENIAL.format(host="127.0.0.1", address="127.0.0.1")] * 4 + [
        DENIAL.format(host="localhost", address=localhost)]
    assert [(job["status"], job["error_message"]) for job in finished] == [("failed", e) for e in expected]
    assert inside.connections_so_far() == []
    assert udp_inside.datagrams_so_far() == []


@pytest.mark.slow
@pytest.mark.parametrize("swallow", [False, True], ids=["passes the error back", "swallows the error"])
def test_a_worker_process_that_the_job_forked_is_denied_and_the_job_fails_with_the_denial_line(inside, swallow):
    """However the worker takes its error, the job process is told of the denial."""
    result = run_here("fetch_in_a_worker_process", {"url": inside.url(), "swallow": swallow}, "--job-timeout", "30")
    assert (result.returncode, error_of(result)) == (1, "url: " + DENIAL.format(host="127.0.0.1", address="127.0.0.1"))
    assert inside.connections_so_far() == []


@pytest.mark.slow
def test_a_denial_in_a_thread_that_the_job_waits_on_fails_the_job_at_once_saying_so(inside):
    """A ThreadPool's worker lets the denial (a BaseException) end its thread, and its task never
    completes: the job would wait for it until its time limit."""
    result = run_here("fetch_in_a_thread_pool", {"url": inside.url()}, "--job-timeout", "20")
    assert (result.returncode, error_of(result)) == (1, "url: " + DENIAL.format(host="127.0.0.1", address="127.0.0.1"))
    assert inside.connections_so_far() == []


@pytest.mark.slow
def test_socket_calls_with_no_address_to_check_behave_in_a_guarded_job_as_without_the_guard():
    result = run_here("socket_calls_that_are_no_connection", {"host": "127.0.0.2"}, *ALLOW_SECOND_LOOPBACK)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "sendmsg_to_none": 1, "sendto_without_address": "TypeError", "connect_to_a_host_alone": "TypeError",
        "connect_to_a_string": "TypeError"}


@pytest.mark.slow
def test_a_runner_allowing_any_network_lets_jobs_reach_the_machine_and_warns_in_its_log(
        worker, start_runner, inside, udp_inside):
    (fetched, sent), output = run_through_runner(
        worker, start_runner, [("fetch_url", {"url": inside.url()}),
                               ("connect_raw", {"host": "127.0.0.1", "port": udp_inside.port, "how": "sendto",
                                                "message": "reached"})],
        "--allow-job-network", "any")
    assert (fetched["status"], fetched["output_data"]) == ("completed", {"body": "content of 127.0.0.1"})
    assert sent["status"] == "completed"
    assert udp_inside.datagrams_so_far() == [b"reached"]
    assert ("WARNING: Jobs may reach any address this machine can, its own services and the networks it "
            "sits in included (--allow-job-network any)") in output


@pytest.mark.slow
def test_run_with_any_network_from_the_environment_reaches_the_machine_and_warns(inside):
    result = run_here("fetch_url", {"url": inside.url()}, env={"RUNPACK_ALLOW_JOB_NETWORKS": "any"})
    assert result.returncode == 0, result.stderr
    assert '"body": "content of 127.0.0.1"' in result.stdout
    assert "Warning: Jobs may reach any address this machine can" in result.stderr


@pytest.mark.slow
def test_allowed_networks_from_the_environment_are_reached_by_run(allowed):
    result = run_here("fetch_url", {"url": allowed.url()}, env={"RUNPACK_ALLOW_JOB_NETWORKS": "127.0.0.2/32"})
    assert result.returncode == 0, result.stderr
    assert '"body": "content of 127.0.0.2"' in result.stdout


IN_PROCESS_WARNING = ("Jobs run in the runner's own process (--in-process): neither the network guard nor "
                      "the memory limit applies to them")


@pytest.mark.slow
def test_a_runner_with_in_process_jobs_warns_that_no_limit_applies(worker, start_runner, inside):
    (fetched,), output = run_through_runner(worker, start_runner, [("fetch_url", {"url": inside.url()})],
                                            "--in-process", "--job-memory-limit", "200M")
    assert fetched["status"] == "completed", "the warning is true: the job reached the machine"
    assert "WARNING: " + IN_PROCESS_WARNING in output


@pytest.mark.slow
def test_run_in_process_warns_on_stderr_that_no_limit_applies(inside):
    result = run_here("fetch_url", {"url": inside.url()}, "--in-process")
    assert result.returncode == 0, result.stderr
    assert "Warning: " + IN_PROCESS_WARNING in result.stderr.splitlines()


@pytest.mark.slow
def test_a_denied_address_that_the_job_once_looked_up_as_no_host_is_still_reported_as_denied(inside):
    """getaddrinfo(None, ...) (a server library asking for its own addresses) leaves no name to blame."""
    result = run_here("connect_raw", {"host": "0.0.0.0", "port": inside.port, "how": "connect",
                                      "look_up_no_host_first": True, "url": inside.url()})
    assert (result.returncode, error_of(result)) == (1, "url: " + DENIAL.format(host="0.0.0.0", address="0.0.0.0"))


# ---- `check` and settings errors -------------------------------------------------------------


def check(worker, tmp_path, *flags):
    return run_cli("check", "--worker-url", worker.url, "--state-dir", str(tmp_path), *flags,
                   env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY})


def job_limit_lines(result):
    """check's lines on the network and the memory (the thread pools' line aside)."""
    return [line.split(None, 2)[2] for line in result.stdout.splitlines()
            if line.startswith("Job limits") and "thread pools" not in line]


@pytest.mark.slow
def test_check_describes_the_allowed_networks_and_the_memory_limit(worker, tmp_path):
    result = check(worker, tmp_path, "--allow-job-network", "127.0.0.2/32", "--job-memory-limit", "200M")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job_limit_lines(result) == [
        "Jobs may reach public addresses and 127.0.0.2/32; not loopback, private (RFC 1918), carrier-grade NAT, "
        "link-local and cloud metadata, IPv6 unique-local and link-local, multicast, reserved, and this "
        "machine's own addresses (--allow-job-network)",
        "Job memory limit: 200 MiB per job"]


@pytest.mark.slow
def test_check_describes_the_default_memory_limit_as_a_share_of_the_machine_per_slot(worker, tmp_path):
    memory = available_memory()
    if not memory:
        pytest.skip("this machine's memory cannot be read")
    result = check(worker, tmp_path, "--concurrency", "2")
    assert job_limit_lines(result)[1] == "Job memory limit: %s per job (the default: 75%% of %s over 2 slots; " \
        "--job-memory-limit)" % (describe_size(max(int(memory * 0.75) // 2, 1 << 30)), describe_size(memory))


@pytest.mark.slow
def test_a_runner_whose_slots_at_the_default_floor_overcommit_the_memory_warns_at_start(worker, start_runner):
    memory = available_memory()
    if not memory:
        pytest.skip("this machine's memory cannot be read")
    slots = memory // DEFAULT_MEMORY_FLOOR + 1
    runner = start_runner("--concurrency", str(slots))
    runner.wait_for_output("WARNING: Jobs may together use more memory than this runner has: %d slots of 1.5 GiB "
                           "(the default's floor) are %s, over its %s; lower --concurrency or set --job-memory-limit"
                           % (slots, describe_size(slots * DEFAULT_MEMORY_FLOOR), describe_size(memory)))
    assert runner.stop() == 0


@pytest.mark.slow
def test_check_with_any_network_says_there_is_no_guard(worker, tmp_path):
    result = check(worker, tmp_path, "--allow-job-network", "any", "--job-memory-limit", "0")
    assert job_limit_lines(result) == [
        "Jobs may reach any address this machine can, its own services and the networks it sits in included "
        "(--allow-job-network any)",
        "Job memory limit: none"]


def one_line_usage_error(result, line):
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]


BAD_LIMITS = [("--allow-job-network", "10.0.0.0/33", "Error: --allow-job-network must be a list of networks such "
                "as 10.1.0.0/16 (or any), got '10.0.0.0/33'"),
              ("--job-memory-limit", "12", "Error: --job-memory-limit must be a size from 64M such as 512M or 4G "
               "(0: no limit), got '12'")]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "run", "runner"])
@pytest.mark.parametrize("flag, value, line", BAD_LIMITS, ids=["allowed network", "memory limit under 64M"])
def test_a_bad_limit_is_one_line_and_exit_2_for_every_command_and_nothing_starts(
        worker, tmp_path, command, flag, value, line):
    flags = {"check": ("check", "--worker-url", worker.url, "--state-dir", str(tmp_path)),
             "run": ("run", "balloon", "megabytes=1") + HANDLERS,
             "runner": ("runner", "--worker-url", worker.url, "--state-dir", str(tmp_path)) + HANDLERS}[command]
    result = run_cli(*(flags + (flag, value)), env={"RUNPACK_RUNNER_API_KEY": RUNNER_KEY})
    one_line_usage_error(result, line)
    assert worker.requests == [], "nothing starts with a bad setting"


@pytest.mark.slow
@pytest.mark.parametrize("size", [TOO_LARGE_TO_READ_AS_A_FLOAT, "8388608T"], ids=["too large for a float",
                                                                              "2**63 bytes"])
def test_a_memory_limit_too_large_to_set_is_one_line_and_exit_2(size):
    result = run_cli("run", "balloon", "megabytes=1", "--job-memory-limit", size, *HANDLERS)
    one_line_usage_error(result, "Error: --job-memory-limit must be a size from 64M such as 512M or 4G "
                                 "(0: no limit), got %r" % size)


@pytest.mark.slow
def test_a_bad_memory_limit_in_the_environment_names_the_variable():
    result = run_cli("run", "balloon", "megabytes=1", *HANDLERS, env={"RUNPACK_JOB_MEMORY_LIMIT": "lots"})
    one_line_usage_error(result, "Error: RUNPACK_JOB_MEMORY_LIMIT must be a size from 64M such as 512M or 4G "
                                 "(0: no limit), got 'lots'")


# ---- The memory limit end to end -------------------------------------------------------------

OVER_THE_LIMIT = "Job exceeded its memory limit of 200 MiB (--job-memory-limit)"


@pytest.mark.slow
def test_a_runners_job_over_the_memory_limit_fails_saying_so_and_the_next_job_completes(worker, start_runner):
    finished, _ = run_through_runner(worker, start_runner, [
        ("balloon", {"megabytes": 400}), ("balloon", {"megabytes": 400, "as": "objects"}),
        ("balloon", {"megabytes": 50})], "--job-memory-limit", "200M")
    assert [(job["status"], job["error_message"]) for job in finished[:2]] == [("failed", OVER_THE_LIMIT)] * 2
    assert finished[2]["status"] == "completed"
    assert finished[2]["output_data"]["held_megabytes"] == 50


@pytest.mark.slow
@pytest.mark.parametrize("setting", [("--job-memory-limit", "200M"), ("RUNPACK_JOB_MEMORY_LIMIT", "200M")],
                         ids=["flag", "environment"])
def test_run_fails_a_job_over_the_memory_limit_saying_so(setting):
    flags, env = (setting, None) if setting[0].startswith("--") else ((), dict([setting]))
    result = run_here("balloon", {"megabytes": 400}, *flags, env=env)
    assert (result.returncode, error_of(result)) == (1, OVER_THE_LIMIT)


@pytest.mark.slow
def test_a_result_too_large_to_encode_under_the_memory_limit_fails_saying_so():
    result = run_here("large_result", {"megabytes": 120}, "--job-memory-limit", "200M")
    assert (result.returncode, error_of(result)) == (1, OVER_THE_LIMIT)


@pytest.mark.slow
def test_a_job_that_holds_on_to_the_memory_it_ran_out_of_still_fails_saying_so():
    """Its report is made and sent in the headroom above the limit."""
    result = run_here("hoard", {}, "--job-memory-limit", "200M")
    assert (result.returncode, error_of(result)) == (1, OVER_THE_LIMIT)


@pytest.mark.slow
def test_a_job_whose_thread_stacks_outgrow_the_memory_limit_fails_saying_so():
    """Near the limit a thread's stack (8 MiB) is often the first allocation to fail."""
    result = run_here("many_threads", {"count": 100}, "--job-memory-limit", "200M")
    assert (result.returncode, error_of(result)) == (1, OVER_THE_LIMIT)


@pytest.mark.slow
def test_job_processes_get_thread_pools_of_their_share_of_the_cpus_unless_set(worker, start_runner):
    share, set_here = str(max(1, _usable_cpus() // 2)), {name: os.environ.get(name) for name in THREAD_POOL_VARIABLES}
    finished, _ = run_through_runner(worker, start_runner, [("thread_pools", {})], "--concurrency", "2")
    assert finished[0]["output_data"] == {name: set_here[name] or share for name in THREAD_POOL_VARIABLES}
    result = run_here("thread_pools", {}, env={"OMP_NUM_THREADS": "3"})
    sizes = json.loads(result.stdout)
    assert sizes["OMP_NUM_THREADS"] == "3"
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert sizes[name] == (set_here[name] or str(_usable_cpus()))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["bytearray", "objects"])
def test_run_completes_a_job_under_the_memory_limit(form):
    result = run_here("balloon", {"megabytes": 50, "as": form}, "--job-memory-limit", "200M")
    assert result.returncode == 0, result.stderr
    assert '"held_megabytes": 50' in result.stdout
