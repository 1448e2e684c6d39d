"""The one way out to receivers: which destinations a delivery may reach, and its request.

The operator decides where deliveries may go: addresses that are globally routable, and
those inside settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS. Anything else (loopback, private,
link-local such as the cloud metadata address, multicast, reserved) is refused, so a hook
cannot make the service reach into its own network. A URL is checked when it is registered
(``check_url``: its form, and the address if it names one) and resolved again at every attempt
(``send``), which connects to the very address it checked: a name that resolves elsewhere the
second time (DNS rebinding) cannot slip past the check. No proxy from the environment, no
redirects, and only the first bytes of a response are read.
"""

import ipaddress
import socket
import string
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import urllib3
from django.conf import settings

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


def problem_with(address):
    """Why deliveries may not go to ``address`` (an ``ipaddress`` address), or None."""
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
            return (
                f"{address} is a {kind_of(candidate)} address, which the operator has not "
                "allowed (LATENTRY_WEBHOOK_ALLOWED_NETWORKS)"
            )
    return None


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
    if address is not None and (problem := problem_with(address)):
        raise Refused(problem)
    return destination


def resolve(destination):
    """The addresses to try for ``destination``, every one allowed: Refused if the name
    resolves to any address that is not (a mixed answer is not picked through), Unreachable if
    it does not resolve."""
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
        if problem := problem_with(address):
            raise Refused(problem if literal is not None else f"{destination.host}: {problem}")
    if not addresses:
        raise Unreachable(f"{destination.host} resolves to no address")
    return addresses


def send(url, body, headers, timeout_s):
    """POST ``body`` to ``url``, connected to an address ``resolve`` allowed; return the
    response's status and its first bytes as text. Refused or Unreachable otherwise."""
    destination = parse(url)
    addresses = resolve(destination)  # every address checked, a literal one too
    headers = {**headers, "Host": destination.host_header}
    for i, address in enumerate(addresses):
        pool = connection_pool(destination, address, timeout_s)
        try:
            response = pool.urlopen(
                "POST",
                destination.target,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except urllib3.exceptions.ConnectTimeoutError as exc:  # refused or timed out: next one
            if i + 1 < len(addresses):
                continue
            raise Unreachable(f"could not connect to {address}: {reason(exc)}") from None
        except urllib3.exceptions.SSLError as exc:  # the certificate, mostly
            raise Unreachable(f"TLS with {address} failed: {reason(exc)}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise Unreachable(f"{address}: {reason(exc)}") from None
        else:
            return response.status, read_start(response)
        finally:
            pool.close()


def connection_pool(destination, address, timeout_s):
    """A pool that connects to ``address`` itself, sending the URL's host name (the Host
    header, and for HTTPS the SNI name and the certificate's expected name)."""
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    if destination.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            str(address),
            destination.port,
            timeout=timeout,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            server_hostname=destination.host,
            assert_hostname=destination.host,
        )
    return urllib3.HTTPConnectionPool(str(address), destination.port, timeout=timeout, maxsize=1)


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
