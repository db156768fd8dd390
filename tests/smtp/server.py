#!/usr/bin/env python3
"""A real SMTP server for the mailer's tests and benchmark (aiosmtpd).

    python3 tests/smtp/server.py PORT MAILBOX [--reject SUBSTRING] [--delay-ms MS]

Listens on 127.0.0.1:PORT (plain SMTP, no AUTH, no TLS) and appends each
accepted message to MAILBOX as one JSON line, flushed per message:

    {"message_id": "<...>", "from": "...", "to": ["..."], "subject": "...",
     "body": "...", "received_at": 1700000000.123}

--reject SUBSTRING answers 550 to every RCPT TO containing SUBSTRING (a
permanent refusal; a mail with no accepted recipient is then refused at DATA
with 554, as any server does). --delay-ms MS sleeps MS milliseconds in DATA
before accepting, so sends stay in flight long enough to kill a client
mid-send; a client that disconnects during that sleep has its message
dropped (never written), as a server drops a transaction it never answered.
Prints "ready" on stdout once listening; runs until killed (SIGTERM or
SIGINT stop it cleanly).
"""

import argparse
import asyncio
import email
import email.policy
import json
import signal
import sys
import threading
import time

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, mailbox, reject, delay_ms):
        self.mailbox = open(mailbox, "a", encoding="utf-8")
        self.reject = reject
        self.delay = delay_ms / 1000.0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject and self.reject in address:
            return "550 5.1.1 <%s>: mailbox unavailable (rejected by the test server)" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if not envelope.rcpt_tos:
            return "554 5.5.1 no valid recipients"
        if self.delay > 0:
            # Cancelled (nothing written) if the client goes away meanwhile.
            await asyncio.sleep(self.delay)
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        message = email.message_from_bytes(content, policy=email.policy.default)
        body_part = message.get_body(preferencelist=("plain",))
        body = body_part.get_content() if body_part is not None else ""
        record = {
            "message_id": str(message.get("Message-ID", "")).strip(),
            "from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "subject": str(message.get("Subject", "")),
            "body": body.rstrip("\r\n"),
            "received_at": time.time(),
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            self.mailbox.write(line)
            self.mailbox.flush()
        return "250 2.0.0 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("mailbox", help="file the accepted messages are appended to (JSON lines)")
    parser.add_argument("--reject", default="", help="answer 550 to recipients containing this")
    parser.add_argument("--delay-ms", type=int, default=0, help="sleep this long in DATA")
    args = parser.parse_args()

    handler = Recorder(args.mailbox, args.reject, args.delay_ms)
    controller = Controller(handler, hostname="127.0.0.1", port=args.port)
    controller.start()
    print("ready", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)
    controller.stop()
    handler.mailbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
