"""A "real relay": a TCP proxy in front of smtp-sink that delays the reply to the end of DATA.

A real relay answers the final ``.`` of a message only after it has written the message to
its queue (10-50 ms); ``smtp-sink -w`` can only wait whole seconds. This proxy follows the
client's side of each SMTP conversation (commands, and message data after a ``354``) to know
which server reply answers an end of data, and holds exactly that reply back for ``--delay-ms``.
Every other reply passes at once; conversations are independent of each other.

    python -m bench.relay --port 2526 --upstream 127.0.0.1:2525 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections import deque

NORMAL, DATA_CMD, DATA_END = 0, 1, 2
END_OF_DATA = b"\r\n.\r\n"


class Conversation:
    """What one client connection is doing: replies expected, in order, and the data phase."""

    def __init__(self) -> None:
        self.expected: deque[int] = deque([NORMAL])  # the greeting
        self.awaiting_data_reply = False
        self.in_data = False
        self.data_fresh = False


async def _client_to_server(
    conv: Conversation, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    buf = b""
    while data := await reader.read(65536):
        writer.write(data)
        # No await between forwarding and parsing: the server's reply cannot be handled
        # before the reply it answers is queued in ``expected``.
        buf += data
        while True:
            if conv.awaiting_data_reply:
                break  # the client sends nothing before it has the reply to DATA
            if conv.in_data:
                if conv.data_fresh:
                    buf = b"\r\n" + buf  # the data may be empty: "." right after the 354
                    conv.data_fresh = False
                i = buf.find(END_OF_DATA)
                if i < 0:
                    buf = buf[-4:]
                    break
                buf = buf[i + len(END_OF_DATA) :]
                conv.in_data = False
                conv.expected.append(DATA_END)
                continue
            i = buf.find(b"\n")
            if i < 0:
                break
            line, buf = buf[:i].strip(), buf[i + 1 :]
            if not line:
                continue
            if line.upper() == b"DATA":
                conv.expected.append(DATA_CMD)
                conv.awaiting_data_reply = True
            else:
                conv.expected.append(NORMAL)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _server_to_client(
    conv: Conversation,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_s: float,
) -> None:
    buf = b""
    reply = b""
    while data := await reader.read(65536):
        buf += data
        out = b""
        while (i := buf.find(b"\n")) >= 0:
            line, buf = buf[: i + 1], buf[i + 1 :]
            reply += line
            if len(line) >= 4 and line[3:4] == b"-":
                continue  # a multi-line reply goes on
            kind = conv.expected.popleft() if conv.expected else NORMAL
            if kind == DATA_CMD:
                conv.awaiting_data_reply = False
                if reply.startswith(b"354"):
                    conv.in_data = conv.data_fresh = True
            elif kind == DATA_END:
                if out:
                    writer.write(out)
                    out = b""
                await asyncio.sleep(delay_s)
            out += reply
            reply = b""
        if out:
            writer.write(out)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _handle(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    delay_s: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    conv = Conversation()
    tasks = [
        asyncio.create_task(_client_to_server(conv, client_reader, server_writer)),
        asyncio.create_task(_server_to_client(conv, server_reader, client_writer, delay_s)),
    ]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        for w in (client_writer, server_writer):
            w.close()


async def serve(port: int, upstream: tuple[str, int], delay_s: float) -> None:
    """Proxy 127.0.0.1:``port`` to ``upstream`` until SIGTERM or SIGINT."""
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, upstream, delay_s), "127.0.0.1", port, backlog=1000
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("relay ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the SMTP server")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve(args.port, (host, int(port)), args.delay_ms / 1000))


if __name__ == "__main__":
    main()
