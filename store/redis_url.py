"""Redis URLs: where the Redis tier connects and how (TCP, TLS, unix socket, cluster seeds).

Forms (``RedisURL.parse``)::

    redis://[[user]:password@]host[:port][/db]      plain TCP, default port 6379, db 0
    rediss://...                                    TLS (``?ssl_cert_reqs=none`` skips
                                                    verification, ``?ssl_ca_certs=path``)
    unix://[[user]:password@]/path/redis.sock[?db=N]
    redis+cluster://host:port,host:port,...          Redis Cluster (seed nodes; also
    redis://host:port,...?cluster=true               rediss+cluster:// for TLS)

A malformed URL raises ConfigError saying what is wrong; the password never appears in a
message or in ``str(url)``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from kvruntime.errors import ConfigError
from kvruntime.store.resp import Address

_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_QUERY = ("cluster", "db", "ssl_cert_reqs", "ssl_ca_certs")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class RedisURL:
    """A parsed Redis URL: the nodes to reach and how (the forms in the module docstring)."""

    addresses: tuple[Address, ...]
    tls: bool = False
    cluster: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls_verify: bool = True
    tls_ca_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Parse one of the forms in the module docstring; raises ConfigError saying why."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in _SCHEMES:
            raise ConfigError(f"redis URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
        rest, _, query_text = rest.partition("?")
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        unknown = sorted(set(query) - set(_QUERY))
        if unknown:
            raise ConfigError(f"redis URL: unknown parameter(s) {unknown}; known: {_QUERY}")
        userinfo, at, rest = rest.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else unquote(user)
            username = username if colon else None
        db_text = query.get("db", "")
        if scheme == "unix":
            if not rest.startswith("/"):
                raise ConfigError(f"redis URL {cls._redact(url)!r}: unix:// needs an absolute path")
            addresses: tuple[Address, ...] = (Address("", 0, unquote(rest)),)
        else:
            hosts, _, path = rest.partition("/")
            db_text = path or db_text
            addresses = tuple(cls._host(h, url) for h in hosts.split(","))
        try:
            db = int(db_text or 0)
        except ValueError:
            raise ConfigError(f"redis URL: db must be an integer, got {db_text!r}") from None
        cluster = scheme.endswith("+cluster") or query.get("cluster", "").lower() in _TRUE
        if len(addresses) > 1 and not cluster:
            raise ConfigError("redis URL: several hosts need cluster mode (redis+cluster://)")
        if cluster and (db or scheme == "unix"):
            raise ConfigError("redis URL: cluster mode supports only TCP and db 0")
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if reqs not in ("none", "optional", "required"):
            raise ConfigError(f"redis URL: ssl_cert_reqs must be none|optional|required: {reqs!r}")
        return cls(
            addresses=addresses,
            tls=scheme.startswith("rediss"),
            cluster=cluster,
            db=db,
            username=username,
            password=password,
            tls_verify=reqs != "none",
            tls_ca_file=query.get("ssl_ca_certs") or None,
        )

    @staticmethod
    def _host(text: str, url: str) -> Address:
        if text.startswith("["):  # [ipv6]:port
            host, _, port = text[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            number = int(port) if port else 6379
        except ValueError:
            raise ConfigError(f"redis URL {RedisURL._redact(url)!r}: bad port {port!r}") from None
        if not host or not 0 < number < 65536:
            raise ConfigError(f"redis URL {RedisURL._redact(url)!r}: bad host/port {text!r}")
        return Address(host, number)

    @staticmethod
    def _redact(url: str) -> str:
        head, at, tail = url.rpartition("@")
        return url if not at else head.split("://")[0] + "://***@" + tail

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def __str__(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        auth = "***@" if self.password is not None else ""
        return f"{scheme}://{auth}{','.join(map(str, self.addresses))}/{self.db}"
