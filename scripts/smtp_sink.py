#!/usr/bin/env python3
"""A real SMTP server for tests: accepts mail with aiosmtpd and writes each message to a
directory, so a test can check what a real SMTP client (lettre) put on the wire.

    python3 scripts/smtp_sink.py --port 2525 --maildir /tmp/mail
        [--user U --password P]            require AUTH PLAIN/LOGIN with these credentials
        [--tls-cert C --tls-key K]         offer STARTTLS (and require it before AUTH/MAIL)
        [--implicit-tls]                   with --tls-cert/--tls-key: TLS from the first byte
        [--exit-on-stdin-eof]              stop when stdin closes (the parent test died)

Each accepted message becomes DIR/<seq>-<random>.json (written to a temporary name and
renamed, so a reader never sees half a file) holding the envelope, the session facts
(authenticated user, TLS) and the message both raw and as Python's email package parses
it: decoded Subject, Message-ID, content types, the text/plain and text/html parts.

Recipients whose local part is "reject" get 550 (permanent), "tempfail" get 451
(transient), so clients can test their error mapping.

Requires aiosmtpd (`pip install aiosmtpd`; scripts/test.sh installs it).
"""

import argparse
import email
import email.policy
import itertools
import json
import logging
import os
import signal
import ssl
import sys
import threading
import uuid
import warnings

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
except ImportError:  # pragma: no cover - reported to the test as a clear failure
    sys.stderr.write("smtp_sink: aiosmtpd is not installed (pip install aiosmtpd)\n")
    sys.exit(3)

_seq = itertools.count(1)
_seq_lock = threading.Lock()


def _parts(msg):
    """The text/plain and text/html bodies (decoded), and every content type seen."""
    text = html = None
    types = []
    for part in msg.walk():
        ctype = part.get_content_type()
        types.append(ctype)
        if part.is_multipart():
            continue
        if ctype == "text/plain" and text is None:
            text = part.get_content()
        elif ctype == "text/html" and html is None:
            html = part.get_content()
    return text, html, types


class Sink:
    def __init__(self, maildir):
        self.maildir = maildir

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local == "reject":
            return "550 5.1.1 <%s>: Recipient address rejected: no such user" % address
        if local == "tempfail":
            return "451 4.3.0 <%s>: Temporary failure, try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        text, html, types = _parts(msg)
        login = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode("utf-8", "replace")
        # STARTTLS sets session.ssl; implicit TLS only shows on the transport.
        transport = getattr(server, "transport", None)
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_login": login,
            "tls": tls,
            "subject": str(msg.get("Subject", "")),
            "from": str(msg.get("From", "")),
            "to": str(msg.get("To", "")),
            "message_id": str(msg.get("Message-ID", "")),
            "content_type": msg.get_content_type(),
            "content_types": types,
            "text": text,
            "html": html,
            "headers": {k: str(v) for k, v in msg.items()},
            "raw": raw.decode("utf-8", "replace"),
        }
        with _seq_lock:
            n = next(_seq)
        name = "%06d-%s.json" % (n, uuid.uuid4().hex[:8])
        tmp = os.path.join(self.maildir, "." + name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
        os.rename(tmp, os.path.join(self.maildir, name))
        return "250 2.0.0 Ok: queued as %s" % name[:-5]


def main():
    # aiosmtpd warns that AUTH without TLS is unsafe; for a loopback test sink that is the
    # point, and the warnings would only clutter the test output.
    warnings.filterwarnings("ignore")
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--implicit-tls", action="store_true")
    ap.add_argument("--exit-on-stdin-eof", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.maildir, exist_ok=True)

    ctx = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            ap.error("--tls-cert and --tls-key go together")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    elif args.implicit_tls:
        ap.error("--implicit-tls needs --tls-cert and --tls-key")

    smtp_kwargs = {"decode_data": False, "enable_SMTPUTF8": True}
    if args.user is not None:
        want = (args.user.encode(), (args.password or "").encode())

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == want
            # auth_data is kept on the session, so the record can say who logged in.
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        smtp_kwargs.update(
            authenticator=authenticator,
            auth_required=True,
            # Without TLS the test relay must still offer AUTH; with TLS, insist on it first
            # like a real submission server.
            auth_require_tls=ctx is not None and not args.implicit_tls,
        )
    if ctx is not None and not args.implicit_tls:
        smtp_kwargs.update(tls_context=ctx, require_starttls=True)

    if ctx is not None and args.implicit_tls:
        smtp_kwargs["ssl_context"] = ctx

    controller = Controller(Sink(args.maildir), hostname=args.host, port=args.port, **smtp_kwargs)
    controller.start()
    sys.stdout.write("smtp_sink listening on %s:%d\n" % (args.host, args.port))
    sys.stdout.flush()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_on_stdin_eof:
        # A test that dies without killing us closes our stdin: stop then, leave no orphan.
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
