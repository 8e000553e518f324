"""Job types that reach for the network or for memory: the limits of a job process must hold them."""

import socket
import urllib.request

import runpack_runner


@runpack_runner.job_type("fetch_url")
def fetch_url(input_params, heartbeat_callback):
    """Fetches ``url`` as a job type that downloads its input would, redirects followed."""
    with urllib.request.urlopen(input_params["url"], timeout=10) as response:
        return {"body": response.read().decode("utf-8")}


@runpack_runner.job_type("connect_raw")
def connect_raw(input_params, heartbeat_callback):
    """Reaches (``host``, ``port``) with a socket of its own: ``how`` is create_connection,
    connect, connect_ex (its result is returned) or sendto (UDP: ``message`` to the port).
    With ``look_up_no_host_first``, it first asks getaddrinfo for no host, as a server library
    asking for its own addresses does."""
    if input_params.get("look_up_no_host_first"):
        socket.getaddrinfo(None, 0, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    address, how = (input_params["host"], input_params["port"]), input_params["how"]
    if how == "create_connection":
        with socket.create_connection(address, timeout=10) as connection:
            return {"received": connection.recv(100).decode("utf-8")}
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    kind = socket.SOCK_DGRAM if how == "sendto" else socket.SOCK_STREAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(10)
        if how == "connect":
            sock.connect(address)
            return {"received": sock.recv(100).decode("utf-8")}
        if how == "connect_ex":
            return {"connect_ex": sock.connect_ex(address)}
        return {"sent": sock.sendto(input_params.get("message", "hello").encode("utf-8"), address)}


@runpack_runner.job_type("balloon")
def balloon(input_params, heartbeat_callback):
    """Holds ``megabytes`` MiB, every page written: as ``bytearray`` in one block, or as
    ``objects``, a list of small bytes objects, as a parser building a large structure would."""
    size = input_params["megabytes"] << 20
    if input_params.get("as", "bytearray") == "bytearray":
        held = bytearray(size)
        for offset in range(0, size, 4096):
            held[offset] = 1
    else:
        held = [bytes(1000) + b"%d" % index for index in range(size // 1000)]
    return {"held_megabytes": input_params["megabytes"], "pieces": len(held)}


@runpack_runner.job_type("thread_pools")
def thread_pools(input_params, heartbeat_callback):
    """The thread pool sizes that the job process was started with."""
    import os

    return {name: os.environ.get(name) for name in runpack_runner.THREAD_POOL_VARIABLES}


@runpack_runner.job_type("many_threads")
def many_threads(input_params, heartbeat_callback):
    """Starts ``count`` idle threads, each with its stack, as a thread pool that grows would."""
    import threading

    release = threading.Event()
    threads = []
    try:
        for _ in range(input_params["count"]):
            threads.append(threading.Thread(target=release.wait))
            threads[-1].start()
    finally:
        release.set()
    return {"threads": len(threads)}


@runpack_runner.job_type("socket_calls_that_are_no_connection")
def socket_calls_that_are_no_connection(input_params, heartbeat_callback):
    """On a UDP socket connected to itself at ``host``: sendmsg with an address of None (the
    connected one), then calls with malformed addresses; what each returned or raised."""
    outcomes = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((input_params["host"], 0))
        sock.connect(sock.getsockname())
        calls = {"sendmsg_to_none": lambda: sock.sendmsg([b"x"], [], 0, None),
                 "sendto_without_address": lambda: sock.sendto(b"x"),
                 "connect_to_a_host_alone": lambda: sock.connect((input_params["host"],)),
                 "connect_to_a_string": lambda: sock.connect(input_params["host"])}
        for name, call in calls.items():
            try:
                outcomes[name] = call()
            except Exception as error:
                outcomes[name] = type(error).__name__
    return outcomes


@runpack_runner.job_type("large_result")
def large_result(input_params, heartbeat_callback):
    """Returns ``megabytes`` MiB of text: encoding it for the report needs as much again."""
    return {"text": "a" * (input_params["megabytes"] << 20)}


@runpack_runner.job_type("fetch_in_a_worker_process")
def fetch_in_a_worker_process(input_params, heartbeat_callback):
    """fetch_url in a forked multiprocessing.Pool worker, as a job that spreads its work would;
    with ``swallow``, the worker takes a failure to fetch for no body, and the job completes."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(fetch_url_or_nothing if input_params.get("swallow") else fetch_url, (input_params, None))


def fetch_url_or_nothing(input_params, heartbeat_callback):
    try:
        return fetch_url(input_params, heartbeat_callback)
    except OSError:
        return {"body": None}




@runpack_runner.job_type("fetch_in_a_thread_pool")
def fetch_in_a_thread_pool(input_params, heartbeat_callback):
    """fetch_url in a multiprocessing ThreadPool, whose workers catch Exception only: a task that
    raises a BaseException never completes, and the job would wait for it."""
    from multiprocessing.pool import ThreadPool

    with ThreadPool(1) as pool:
        return pool.apply(fetch_url, (input_params, None))

HOARDED = []  # the hoard job type's memory: module-level, so that the job's failure does not free it


@runpack_runner.job_type("hoard")
def hoard(input_params, heartbeat_callback):
    """Holds on to ever more small objects until an allocation fails, as a job that caches all it
    reads would: the MemoryError ends the job, and the memory stays held."""
    while True:
        HOARDED.append(bytes(100) + b"%d" % len(HOARDED))
