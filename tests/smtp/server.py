#!/usr/bin/env python3
"""A real SMTP server for the mailer's tests and benchmark (aiosmtpd).

    python3 tests/smtp/server.py PORT MAILBOX [--reject SUBSTRING] [--delay-ms MS]
        [--tls-cert CERT --tls-key KEY (--starttls | --implicit-tls)]
        [--auth USER:PASSWORD [--auth-without-tls]] [--events FILE]
        [--connections FILE]

Listens on 127.0.0.1:PORT (plain SMTP, no AUTH, no TLS unless asked) and
appends each accepted message to MAILBOX as one JSON line, flushed per
message:

    {"message_id": "<...>", "from": "...", "to": ["..."], "subject": "...",
     "body": "...", "received_at": 1700000000.123, "tls": true,
     "login": "user" or null}

--starttls offers STARTTLS with CERT and KEY and requires it
(`require_starttls`: every command but EHLO, STARTTLS and QUIT is refused
with 530 before it); --implicit-tls speaks TLS from the first byte (SMTPS).
--auth USER:PASSWORD accepts that one login (PLAIN or LOGIN) and requires it
before MAIL (`auth_required`); AUTH is offered and taken only over TLS
(`auth_require_tls`; an implicit-TLS connection is TLS throughout), unless
--auth-without-tls, which offers it in the clear too: a server inviting a
client to give its password away. --events FILE records what clients did,
one JSON line each, flushed: {"event": "ehlo" | "auth_command" | "auth" |
"mail_command", "tls": bool, ...}: "auth_command" and "mail_command" for
every AUTH and MAIL command that reaches its handler, before its checks
(only --starttls's refusal of commands before STARTTLS comes first; AUTH
with its mechanism only), "auth" for every login checked (with the login and
whether it was accepted; never the password). --connections FILE gets a
line "open" when a client connects and "closed" once its connection is gone
and whatever it had in hand was written or dropped: as many "closed" as
"open" lines means no client session is left that could still write a
message.

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
import ssl
import sys
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def encrypted(server):
    """Whether the session's transport is TLS (implicit, or after STARTTLS)."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class Events:
    """What clients did, as JSON lines (never a password)."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def record(self, event, server, **fields):
        if self.file is None:
            return
        line = json.dumps({"event": event, "tls": encrypted(server), **fields}) + "\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()


class Authenticator:
    """Accepts one login; records every login it is asked to check."""

    def __init__(self, login, password, events):
        self.login = login.encode()
        self.password = password.encode()
        self.events = events

    def __call__(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        accepted = auth_data.login == self.login and auth_data.password == self.password
        self.events.record(
            "auth",
            server,
            mechanism=mechanism,
            login=auth_data.login.decode("utf-8", "replace"),
            accepted=accepted,
        )
        return AuthResult(success=accepted, handled=False, auth_data=auth_data)


class RecordingSMTP(SMTP):
    """Records every AUTH and MAIL command before aiosmtpd checks it."""

    def __init__(self, *args, events, connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = events
        self.connections = connections

    def connection_made(self, transport):
        self.connections.write("open")
        super().connection_made(transport)

    def connection_lost(self, error):
        # After this the session's handler is cancelled: a message whose
        # DATA it was still sleeping in is never written.
        super().connection_lost(error)
        self.connections.write("closed")

    async def smtp_AUTH(self, arg):
        # The mechanism only: the rest may be the password, base64-encoded.
        mechanism = arg.split()[0] if arg else ""
        self.events.record("auth_command", self, mechanism=mechanism)
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg):
        self.events.record("mail_command", self, arg=arg)
        await super().smtp_MAIL(arg)


class Lines:
    """Appends lines to a file, flushed each (nothing if there is no file)."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def write(self, line):
        if self.file is None:
            return
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()


class RecordingController(Controller):
    def __init__(self, *args, events, connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = events
        self.connections = connections

    def factory(self):
        return RecordingSMTP(
            self.handler, events=self.events, connections=self.connections, **self.SMTP_kwargs
        )


class Recorder:
    def __init__(self, mailbox, reject, delay_ms, events):
        self.mailbox = open(mailbox, "a", encoding="utf-8")
        self.reject = reject
        self.delay = delay_ms / 1000.0
        self.events = events
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.events.record("ehlo", server, hostname=hostname)
        return responses

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
            "tls": encrypted(server),
            "login": session.auth_data.login.decode() if session.authenticated else None,
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
    parser.add_argument("--tls-cert", help="the server's certificate (PEM)")
    parser.add_argument("--tls-key", help="its key (PEM)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_true", help="offer and require STARTTLS")
    mode.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte")
    parser.add_argument("--auth", help="USER:PASSWORD, the one login accepted (and required)")
    parser.add_argument("--auth-without-tls", action="store_true", help="offer AUTH in the clear")
    parser.add_argument("--events", help="file recording EHLO, AUTH and MAIL (JSON lines)")
    parser.add_argument("--connections", help="file recording each connection opened and closed")
    args = parser.parse_args()

    events = Events(args.events)
    handler = Recorder(args.mailbox, args.reject, args.delay_ms, events)
    smtp = {}
    context = None
    if args.starttls or args.implicit_tls:
        if not (args.tls_cert and args.tls_key):
            parser.error("--starttls and --implicit-tls need --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.starttls:
        smtp.update(tls_context=context, require_starttls=True)
    if args.auth:
        login, _, password = args.auth.partition(":")
        smtp.update(
            authenticator=Authenticator(login, password, events),
            auth_required=True,
            # aiosmtpd knows only STARTTLS as TLS: over implicit TLS, the
            # connection is encrypted from the first byte already.
            auth_require_tls=not (args.auth_without_tls or args.implicit_tls),
        )
    controller = RecordingController(
        handler,
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=context if args.implicit_tls else None,
        events=events,
        connections=Lines(args.connections),
        **smtp,
    )
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
