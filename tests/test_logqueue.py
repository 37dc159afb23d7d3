"""The bounded log queue against a real pipe nobody reads, in-process and under the real program."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
from typing import Iterator, List, Tuple

import pytest
from gvret_client import GvretClient
from harness import SERVER, ServerProcess, wait_until

from wiretap.logqueue import LogQueue

PIPE_SIZE = 4096  # the smallest pipe Linux makes (one page): full after a few dozen lines


def small_pipe() -> Tuple[int, int]:
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


def unread(read_fd: int) -> int:
    """Bytes waiting in the pipe."""
    return int.from_bytes(fcntl.ioctl(read_fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def read_all(read_fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            return b"".join(chunks).decode()
        chunks.append(chunk)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    named = logging.getLogger("test.logqueue")
    named.propagate = False
    named.setLevel(logging.INFO)
    yield named
    named.handlers.clear()


def test_a_stalled_pipe_costs_counted_records_never_a_waiting_logger(logger):
    read_fd, write_fd = small_pipe()
    stream = os.fdopen(write_fd, "w")
    target = logging.StreamHandler(stream)
    logs = LogQueue(target, logger, capacity=100)
    logs.start()
    total = 3000
    for number in range(total):  # each call returns although nobody reads the pipe
        logger.info("record %05d of a flood that the pipe cannot take", number)
    assert logs.records.qsize() <= 100
    assert logs.dropped >= total - 100 - PIPE_SIZE // 40

    output: List[str] = []
    reader = threading.Thread(target=lambda: output.append(read_all(read_fd)))
    reader.start()  # stderr recovers
    assert logs.stop() is True
    logger.info("logged after stop, written at once")
    stream.close()
    reader.join()
    lines = output[0].splitlines()

    records = [line for line in lines if line.startswith("record ")]
    reported = [int(m.group(1)) for m in map(re.compile(r"log: (\d+) lines dropped,").match, lines)
                if m]  # fmt: skip
    assert records == sorted(records)  # none reordered
    assert len(records) + logs.dropped == total
    assert sum(reported) == logs.dropped
    assert lines[-2:] == [f"log: {logs.dropped} lines dropped in all",
                          "logged after stop, written at once"]  # fmt: skip


def test_stop_gives_up_on_a_pipe_that_takes_nothing(logger):
    read_fd, write_fd = small_pipe()
    stream = os.fdopen(write_fd, "w")
    logs = LogQueue(logging.StreamHandler(stream), logger, capacity=100)
    logs.start()
    for number in range(500):
        logger.info("record %05d fills the pipe and the queue", number)
    wait_until(lambda: unread(read_fd) > PIPE_SIZE - 64, what="a full pipe")
    assert logs.stop() is False
    # The writer is blocked in a write now, so the room it left in the queue stays as it is: it
    # took records off the full queue after the flood ended, until the pipe filled.
    dropped, room = logs.dropped, logs.records.maxsize - logs.records.qsize()
    assert room < 100
    for number in range(100):  # a thread still logging after the stop is not held up either
        logger.info("record %05d after the stop", number)
    assert logs.dropped == dropped + 100 - room
    assert logs.records.qsize() == logs.records.maxsize
    os.close(read_fd)  # the writer thread's blocked write now fails, and the thread ends
    stream.close = lambda: None  # type: ignore[method-assign]


def test_sigterm_exits_although_stderr_is_a_pipe_nobody_reads():
    read_fd, write_fd = small_pipe()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0",
         "--iface", "replay:examples/demo.log", "--replay-loop", "--stats-interval", "0"],
        stdout=subprocess.DEVNULL, stderr=write_fd, cwd=SERVER.parent,
    )  # fmt: skip
    os.close(write_fd)
    try:
        head = b""
        while b" for GVRET clients" not in head:
            chunk = os.read(read_fd, 1)
            assert chunk, head
            head += chunk
        port = int(re.search(rb"listening on [^ ]+:(\d+) ", head).group(1))
        # Nobody reads from here on: every client costs a "connected" and a "disconnected" line,
        # until the pipe is full. "Full" is when 50 more clients in a row add nothing: a pending
        # line longer than the room left blocks the writer with that room still free.
        unchanged = 0
        for _ in range(5000):
            before = unread(read_fd)
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
            unchanged = unchanged + 1 if unread(read_fd) == before else 0
            if unchanged == 50 and before > PIPE_SIZE // 2:
                break
        else:
            pytest.fail(f"the pipe never filled: {unread(read_fd)} bytes in it")
        for _ in range(20):  # and 40 more lines, more than the pipe has room for
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_fd)


CLIENTS = 15


def test_every_client_disconnected_line_is_written_before_exit():
    server = ServerProcess("--port", "0", "--stats-interval", "0", "--iface",
                           "replay:examples/demo.log", "--replay-loop")  # fmt: skip
    try:
        port = server.wait_listening()
        clients = [GvretClient(port) for _ in range(CLIENTS)]
        wait_until(lambda: sum("binary mode" in line for line in server.lines) == CLIENTS)
        assert server.stop() == 0
        for client in clients:
            client.close()
    finally:
        server.kill()
    assert sum(" disconnected (" in line for line in server.lines) == CLIENTS
