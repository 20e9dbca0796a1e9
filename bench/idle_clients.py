#!/usr/bin/env python3
"""Opens N client connections to a balancer, sends one request on each, reads
the whole answer and then keeps every connection open and idle until stdin
closes (or a line arrives). Prints "ready OK/N" once all of them are idle.

    idle_clients.py HOST:PORT N {h1,tls-h1,tls-h2} [SNI]

Used by bench/idle.sh to measure what an idle kept-alive connection costs a
balancer. HTTP/2 is spoken by hand (preface, SETTINGS, one HEADERS frame,
SETTINGS ACK) so that nothing beyond the standard library is needed.
"""
import asyncio
import ssl
import struct
import sys

OPEN_AT_ONCE = 256


def h1_request(host):
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: idle\r\n\r\n".encode()


async def read_h1_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return head
    if length:
        await reader.readexactly(length)
    return head


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    """Literal header field without indexing, indexed name (RFC 7541 6.2.2)."""
    v = value.encode()
    assert index < 15 and len(v) < 127
    return bytes([index]) + bytes([len(v)]) + v


def h2_request(host):
    block = (
        b"\x82"  # :method GET
        + b"\x87"  # :scheme https
        + b"\x84"  # :path /
        + hpack_literal(1, host)  # :authority
    )
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(0x4, 0, 0)  # SETTINGS (defaults)
        + frame(0x1, 0x5, 1, block)  # HEADERS, END_STREAM | END_HEADERS
    )


async def read_h2_response(reader, writer):
    """Reads frames until stream 1 ends; answers SETTINGS and PING."""
    while True:
        header = await reader.readexactly(9)
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        payload = await reader.readexactly(length)
        if kind == 0x4 and not flags & 0x1:
            writer.write(frame(0x4, 0x1, 0))
        elif kind == 0x6 and not flags & 0x1:
            writer.write(frame(0x6, 0x1, 0, payload))
        elif kind == 0x7:
            raise ConnectionError(f"GOAWAY {payload[:8].hex()}")
        elif stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            await writer.drain()
            return


async def one(host, port, mode, sni, context, conns, failures):
    try:
        if mode == "h1":
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=sni
            )
        if mode == "tls-h2":
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                raise ConnectionError("h2 not negotiated")
            writer.write(h2_request(sni))
            await read_h2_response(reader, writer)
        else:
            writer.write(h1_request(sni))
            head = await read_h1_response(reader)
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        conns.append((reader, writer))
    except Exception as e:  # counted and reported, the run goes on
        failures.append(repr(e))


async def main():
    target, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sni = sys.argv[4] if len(sys.argv) > 4 else "localhost"
    host, _, port = target.rpartition(":")
    context = None
    if mode != "h1":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"] if mode == "tls-h2" else ["http/1.1"])
    conns, failures = [], []
    for start in range(0, count, OPEN_AT_ONCE):
        batch = range(start, min(count, start + OPEN_AT_ONCE))
        await asyncio.gather(*(one(host, int(port), mode, sni, context, conns, failures) for _ in batch))
    print(f"ready {len(conns)}/{count}", flush=True)
    if failures:
        print(f"failures {len(failures)}: {failures[0]}", file=sys.stderr, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for _, writer in conns:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
