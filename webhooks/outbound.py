"""The one way out to receivers: which destinations a delivery may reach, and its request.

The operator decides where deliveries may go: addresses that are globally routable, and
those inside settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS. Anything else (loopback, private,
link-local such as the cloud metadata address, multicast, reserved) is refused, so a hook
cannot make the service reach into its own network. A URL is checked when it is registered
(``check_url``: its form, and the address if it names one) and resolved again at every attempt
(``send``), which connects to the very address it checked: a name that resolves elsewhere the
second time (DNS rebinding) cannot slip past the check. A refusal names the kind of address a
name resolves to, never the address, so that hooks cannot map the names of the service's own
network. No proxy from the environment, no redirects, only the first bytes of a response are
read, and the whole exchange ends by a deadline (``Deadline``).
"""

import contextlib
import http.client
import ipaddress
import socket
import ssl
import string
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import urllib3
from django.conf import settings
from urllib3.util.ssl_match_hostname import CertificateError

SCHEMES = {"http": 80, "https": 443}
RESPONSE_BYTES = 1024  # read of a response body, for the record of a failed attempt


class Refused(Exception):
    """Deliveries may not go there; trying again would not help."""


class Unreachable(Exception):
    """The attempt found no answer (name resolution, connection, timeout); a later one may."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # a name, or an address without brackets
    port: int
    target: str  # path and query
    host_header: str


def parse(url):
    """The Destination of ``url``; Refused, naming the problem, if it cannot be one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"the URL is malformed: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise Refused("the URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL must not hold a user name or password: check the signature instead")
    if not parts.hostname:
        raise Refused("the URL names no host")
    try:
        host = parts.hostname
        host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise Refused(f"{parts.hostname!r} is not a valid host name") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    bracketed = f"[{host}]" if ":" in host else host
    return Destination(
        scheme=parts.scheme,
        host=host,
        port=port or SCHEMES[parts.scheme],
        target=quote(target, safe=string.punctuation),  # non-ASCII as UTF-8 %-escapes
        host_header=f"{bracketed}:{port}" if port else bracketed,
    )


def allowed_networks():
    return [
        ipaddress.ip_network(n, strict=False) for n in settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS
    ]


def refused_kind(address):
    """The kind of address ``address`` (an ``ipaddress`` address) is, "private", "loopback" and
    so on, when deliveries may not go there; None when they may."""
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if any(address in network for network in allowed_networks()):
        return None
    # A 6to4 address reaches the IPv4 address it carries as well. (NAT64's 64:ff9b::/96 lies in
    # ::/8, which counts as reserved: refused whatever it carries.)
    carried = [address.sixtofour] if address.version == 6 and address.sixtofour else []
    for candidate in (address, *carried):
        site_local = candidate.version == 6 and candidate.is_site_local  # fec0::/10: "global"
        if not candidate.is_global or candidate.is_multicast or candidate.is_reserved or site_local:
            return kind_of(candidate)
    return None


def refusal(subject, kind):
    """Refused: ``subject`` (an address the user wrote, or "<name> resolves to") is a ``kind``
    address."""
    return Refused(
        f"{subject} a {kind} address, which the operator has not allowed "
        "(LATENTRY_WEBHOOK_ALLOWED_NETWORKS)"
    )


def kind_of(address):
    kinds = [
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("site-local", address.version == 6 and address.is_site_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ]
    return next((name for name, it_is in kinds if it_is), "non-public")


def literal_address(host):
    """The address ``host`` spells, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url(url):
    """Refused, naming the problem, unless ``url`` could receive deliveries: http(s), a host,
    and, where the host is an address, an allowed one. A name is resolved at each attempt."""
    destination = parse(url)
    address = literal_address(destination.host)
    if address is not None and (kind := refused_kind(address)):
        raise refusal(f"{address} is", kind)
    return destination


def resolve(destination):
    """The addresses to try for ``destination``, every one allowed: Refused if the name
    resolves to any address that is not (a mixed answer is not picked through), naming its kind
    but not the address; Unreachable if it does not resolve."""
    literal = literal_address(destination.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            found = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise Unreachable(f"{destination.host} does not resolve: {exc}") from None
        # A link-local IPv6 answer may carry a zone ("fe80::1%eth0"); the address is the rest.
        names = dict.fromkeys(info[4][0].partition("%")[0] for info in found)
        addresses = [ipaddress.ip_address(name) for name in names]
    for address in addresses:
        if kind := refused_kind(address):
            subject = f"{address} is" if literal is not None else f"{destination.host} resolves to"
            raise refusal(subject, kind)
    if not addresses:
        raise Unreachable(f"{destination.host} resolves to no address")
    return addresses


def send(url, body, headers, deadline_s):
    """POST ``body`` to ``url``, connected to an address ``resolve`` allowed, and return the
    response's status and its first bytes as text, all within ``deadline_s`` seconds from the
    connection's start (name resolution comes before). Refused or Unreachable otherwise."""
    destination = parse(url)
    addresses = resolve(destination)  # every address checked, a literal one too
    headers = {**headers, "Host": destination.host_header}
    with Deadline(deadline_s) as deadline:
        for i, address in enumerate(addresses):
            try:
                return exchange(destination, address, body, headers, deadline)
            except urllib3.exceptions.ConnectTimeoutError as exc:  # refused or timed out
                if i + 1 < len(addresses) and not deadline.passed:
                    continue  # the next address
                error = f"could not connect to {address}: {reason(exc)}"
            except (ssl.SSLError, CertificateError) as exc:  # the certificate, mostly
                error = f"TLS with {address} failed: {reason(exc)}"
            except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
                error = f"{address}: {reason(exc)}"
            raise Unreachable(deadline.missed if deadline.passed else error)


def exchange(destination, address, body, headers, deadline):
    """The request to one address and the start of its answer, cut off at ``deadline``."""
    connection = connection_to(destination, address, timeout_s=deadline.left())
    try:
        connection.connect()  # its timeout: what is left of the deadline
        deadline.watch(connection.sock)
        connection.request(
            "POST", destination.target, body=body, headers=headers, preload_content=False
        )
        response = connection.getresponse()
        return response.status, read_start(response)
    finally:
        deadline.release()
        connection.close()


def connection_to(destination, address, timeout_s):
    """A connection to ``address`` itself that sends the URL's host name (the Host header,
    and for HTTPS the SNI name and the certificate's expected name)."""
    if destination.scheme == "https":
        return urllib3.connection.HTTPSConnection(
            str(address),
            destination.port,
            timeout=timeout_s,
            cert_reqs="CERT_REQUIRED",
            server_hostname=destination.host,
            assert_hostname=destination.host,
        )
    return urllib3.connection.HTTPConnection(str(address), destination.port, timeout=timeout_s)


class Deadline:
    """The wall-clock limit of one attempt, which connecting, sending and every read share.

    A socket's timeout bounds each read alone, so a receiver that drips a byte every second
    would hold the attempt, and a worker, for as long as it likes. A timer shuts the watched
    socket down when the time is up, which ends the read or write under way at once.
    """

    def __init__(self, seconds):
        self.seconds, self.ends = seconds, time.monotonic() + seconds
        self.sock = None
        self.lock = threading.Lock()  # the socket is not closed while the timer shuts it down
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc_info):
        self.timer.cancel()

    @property
    def passed(self):
        return time.monotonic() >= self.ends

    @property
    def missed(self):
        return f"no complete answer within {self.seconds:g} s (LATENTRY_WEBHOOK_DEADLINE_S)"

    def left(self):
        """Seconds left; Unreachable when none are (a socket timeout of 0 would not block)."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise Unreachable(self.missed)
        return left

    def watch(self, sock):
        """Shut ``sock`` down at the deadline, or now if it has passed."""
        with self.lock:
            self.sock = sock
        if self.passed:
            self.expire()

    def release(self):
        """Stop watching, before the socket is closed (its number may be reused)."""
        with self.lock:
            self.sock = None

    def expire(self):
        with self.lock:
            if self.sock is None:
                return
            # The plain socket's shutdown, under TLS too: it ends the other thread's read without
            # touching the TLS state that thread is in the middle of. OSError: already closed.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


def read_start(response):
    """Up to RESPONSE_BYTES of the body, as text; the rest is never read."""
    try:
        start = response.read(RESPONSE_BYTES, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError):
        start = b""
    finally:
        response.close()
    return start.decode("utf-8", "replace")


def reason(exc):
    """An urllib3 error without the pool's description in front."""
    return str(exc).rpartition("): ")[2] or type(exc).__name__
