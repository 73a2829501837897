"""HTTP signatures: signing outbound requests, checking inbound ones, and body digests.

This module owns both signature schemes spoken on the fediverse:

* draft-cavage-http-signatures-12 (``Signature: keyId=…,headers=…,signature=…``). Every
  server accepts it, so it is what we send (:func:`sign_request`). Inbound we accept
  ``rsa-sha256`` and ``hs2019`` (RSA-SHA256 with an RSA key, as Mastodon reads it).
* RFC 9421 HTTP Message Signatures (``Signature-Input`` + ``Signature``), sent by Mastodon
  4.5 and by Fedify, which tries it first and only falls back to cavage after a 401.
  Inbound we accept ``rsa-v1_5-sha256`` and ``ed25519``; :func:`sign_request_rfc9421` signs.
* The body digests the signatures cover: ``Digest`` (RFC 3230) and ``Content-Digest``
  (RFC 9530), SHA-256 only.

Checking is split so the inbox fetches a key only for a request that is otherwise
acceptable: :func:`parse_signature` makes every check that needs no key and returns a
frozen :class:`SignedRequest`; :func:`verify_signature` checks it against the PEM the
caller looked up. Pure: no network, no database, no clock (``now`` is passed in), nothing
done at import time.

Structured fields (RFC 8941) are parsed and serialised with ``http-sf`` (the reference
implementation by the RFC's author) instead of a hand-written parser: the only known
version conflict (bovine's RFC 9421 code needs http-sf 1.0.x) does not touch us, since
the test-only cross-check library http-message-signatures itself needs http-sf >= 1.4.
Every size bound below is applied before http-sf sees a field, so a hostile header costs
bounded time and memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from functools import lru_cache
from urllib.parse import urlsplit

import http_sf
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from http_sf.innerlist import ser_innerlist
from http_sf.types import ItemType, ParamsType

from fediblog.errors import SignatureError

MAX_FIELD_LENGTH = 8192  # Signature, Signature-Input, Digest, Content-Digest
MAX_COVERED = 24  # real senders cover 3-8 parts; this caps the signing-string work
_MAX_SIGNATURE_BYTES = 1024  # an 8192-bit RSA signature
_MAX_PEM_LENGTH = 16384
# An HTTP date is 29 characters ("Sun, 06 Nov 1994 08:49:37 GMT"), its obsolete forms
# no more: longer is refused before the parse cache, which keeps whole values.
_MAX_DATE_LENGTH = 64
_CLOCK_SKEW_SECONDS = 300
# Mastodon and GoToSocial use 2048-bit keys, Misskey 4096; smaller is forgeable, larger
# only costs us time.
_RSA_BITS = range(2048, 8193)

_CAVAGE_ALGORITHMS = frozenset({"rsa-sha256", "hs2019"})
_RFC9421_ALGORITHMS = frozenset({"rsa-v1_5-sha256", "ed25519"})
_RFC9421_PARAMS = frozenset({"alg", "created", "expires", "keyid", "nonce", "tag"})
_DERIVED = frozenset(
    {"@method", "@target-uri", "@authority", "@scheme", "@path", "@query", "@request-target"}
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
_USUAL_NAMES = frozenset({"host", "date", "digest", "content-type", "content-length", "accept"})
# One cavage parameter: name="value" (no escapes exist in cavage) or name=digits.
_CAVAGE_PARAM = re.compile(r'\s*([A-Za-z]{1,32})=(?:"([^"]*)"|([0-9]{1,15}))\s*(?:,|\Z)', re.ASCII)
_INTEGER = re.compile(r"[0-9]{1,15}")  # str.isdigit() would let "²" through to int()
_HASHES = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_Window = tuple[float, int, int]  # now (POSIX seconds), seconds allowed behind, ahead
_SET_BY_SIGNER = frozenset(
    {"host", "date", "digest", "content-digest", "signature", "signature-input"}
)


def digest_header(body: bytes) -> str:
    """The RFC 3230 ``Digest`` value for ``body``: ``SHA-256=<base64>``."""
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def content_digest_header(body: bytes) -> str:
    """The RFC 9530 ``Content-Digest`` value for ``body``: ``sha-256=:<base64>:``."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


class HeaderFields(dict[str, str]):
    """A request's header fields as both signature schemes read them: lower-case
    names, values without surrounding blanks, a field sent on several lines joined
    with ", ". :func:`parse_signature` takes one as it is; any other mapping it
    normalises first. :meth:`from_raw` is the only way to build one (once per request):
    the constructor takes no fields, as a dict's would go in unnormalised and be
    trusted as they are."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> HeaderFields:
        """From ASGI's ``scope["headers"]`` (bytes as they came on the wire)."""
        fields = cls()
        for raw_name, raw_value in raw:
            name = raw_name.lower().decode("latin-1")
            value = raw_value.decode("latin-1").strip(" \t")
            before = fields.get(name)
            fields[name] = value if before is None else f"{before}, {value}"
        return fields


@dataclass(frozen=True, slots=True)
class _Request:
    """What a signature can cover, seen from this server (``fields``: lowercase names)."""

    method: str
    path_and_query: str
    fields: Mapping[str, str]
    authority: str  # this server's host, default port removed
    scheme: str


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The parsed, NOT yet verified signature of a request (see :func:`verify_signature`)."""

    key_id: str
    scheme: str  # "cavage" or "rfc9421"
    algorithm: str  # as claimed by the sender; "" when left out (derived from the key)
    covered: tuple[str, ...]  # covered headers / components, in signed order
    created: datetime  # cavage: the signed Date; RFC 9421: the created parameter
    signature: bytes
    signing_string: bytes  # exactly what the signature must be over


# --- outbound ----------------------------------------------------------------------


def sign_request(
    method: str,
    url: str,
    *,
    body: bytes | None,
    key_id: str,
    private_key: rsa.RSAPrivateKey,
    now: datetime,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Sign with draft-cavage ``rsa-sha256`` over ``(request-target) host date [digest]``.

    Returns the headers to send: Host, Date, Digest (when there is a body), the given
    ``headers`` passed through (e.g. Content-Type), and Signature.
    """
    if '"' in key_id:
        raise ValueError("a cavage keyId cannot contain a double quote")
    digest = None if body is None else ("Digest", digest_header(body))
    out, request = _outbound(method, url, now, headers, digest)
    covered = ["(request-target)", "host", "date"] + (["digest"] if digest else [])
    signed = _cavage_string(request, covered, {})
    signature = private_key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    out["Signature"] = (
        f'keyId="{key_id}",algorithm="rsa-sha256",headers="{" ".join(covered)}",'
        f'signature="{base64.b64encode(signature).decode("ascii")}"'
    )
    return out


def sign_request_rfc9421(
    method: str,
    url: str,
    *,
    body: bytes | None,
    key_id: str,
    private_key: rsa.RSAPrivateKey,
    now: datetime,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Sign with RFC 9421 ``rsa-v1_5-sha256``, label ``sig1``, over ``@method``,
    ``@target-uri`` and, when there is a body, ``content-digest``; params ``created``,
    ``keyid``, ``alg``. Returns Host, Date, Content-Digest, the given ``headers``,
    Signature-Input and Signature."""
    digest = None if body is None else ("Content-Digest", content_digest_header(body))
    out, request = _outbound(method, url, now, headers, digest)
    covered = ["@method", "@target-uri"] + (["content-digest"] if digest else [])
    params: ParamsType = {"created": int(now.timestamp()), "keyid": key_id}
    params["alg"] = "rsa-v1_5-sha256"  # dicts keep order: created, keyid, alg
    base = _rfc9421_base(request, covered, params)
    signature = private_key.sign(base, padding.PKCS1v15(), hashes.SHA256())
    items: list[ItemType] = [(name, {}) for name in covered]
    out["Signature-Input"] = "sig1=" + ser_innerlist((items, params))
    out["Signature"] = http_sf.ser({"sig1": (signature, {})})
    return out


def _outbound(
    method: str,
    url: str,
    now: datetime,
    headers: Mapping[str, str] | None,
    digest: tuple[str, str] | None,
) -> tuple[dict[str, str], _Request]:
    """The headers to send but the signature, and the request as the receiver will see it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"cannot sign a request to {url!r}")
    out = {"Host": parts.netloc.lower(), "Date": format_datetime(now.astimezone(UTC), usegmt=True)}
    if digest is not None:
        out[digest[0]] = digest[1]
    for name, value in (headers or {}).items():
        if name.lower() in _SET_BY_SIGNER:
            raise ValueError(f"{name} is set by the signer, not by the caller")
        out[name] = value
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = {name.lower(): value for name, value in out.items()}
    return out, _Request(method.upper(), target, fields, _authority(out["Host"], scheme), scheme)


# --- inbound -----------------------------------------------------------------------


def parse_signature(
    method: str,
    path_and_query: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    expected_host: str,
    now: datetime,
    max_past_seconds: int = 3900,
    max_future_seconds: int = 3600,
    scheme: str = "https",
) -> SignedRequest:
    """Make every check that needs no key; raise :class:`SignatureError` with the reason.

    ``path_and_query`` is the request target exactly as sent (raw path, not
    percent-decoded, plus ``?query``). ``expected_host`` is this blog's configured
    public host: signatures made for another host are refused even when a proxy or
    attacker sets a matching Host header. RFC 9421 wins when both schemes are present.
    The defaults of the time window are Mastodon's (1 h ahead, 1 h 5 min behind).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if scheme not in ("https", "http"):
        raise ValueError(f"unsupported scheme {scheme!r}")
    fields = headers if type(headers) is HeaderFields else _header_fields(headers)
    for name in ("signature", "signature-input", "digest", "content-digest"):
        if len(fields.get(name, "")) > MAX_FIELD_LENGTH:
            raise SignatureError(f"{name} header is longer than {MAX_FIELD_LENGTH} bytes")
    request = _Request(method, path_and_query, fields, _authority(expected_host, scheme), scheme)
    window = (now.timestamp(), max_past_seconds, max_future_seconds)
    if "signature-input" in fields:
        signed = _parse_rfc9421(request, window)
        digest_field, check_digest = "content-digest", _check_content_digest
    elif "signature" in fields:
        signed = _parse_cavage(request, window)
        digest_field, check_digest = "digest", _check_digest
    else:
        raise SignatureError("request is not signed (no Signature header)")
    if digest_field in signed.covered:
        check_digest(fields[digest_field], body)
    elif method.upper() == "POST" or body:
        raise SignatureError(f"{digest_field} must be signed on a request with a body")
    return signed


@lru_cache(maxsize=4096)
def _public_key(pem: str) -> PublicKeyTypes:
    # Parsing a PEM costs more than the RSA verification itself; an inbox sees the
    # same few thousand keys over and over.
    return serialization.load_pem_public_key(pem.encode("ascii"))


def verify_signature(signed: SignedRequest, public_key_pem: str) -> None:
    """Check the signature with the signer's key; raise :class:`SignatureError` if it fails,
    including when the key type does not fit the claimed algorithm."""
    if len(public_key_pem) > _MAX_PEM_LENGTH:
        raise SignatureError("the signer's public key is too large")
    try:
        key = _public_key(public_key_pem)
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("the signer's public key is not a readable PEM key") from None
    algorithm = signed.algorithm or "(none)"
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if signed.algorithm not in ("rsa-sha256", "hs2019", "rsa-v1_5-sha256", ""):
                raise SignatureError(f"algorithm {algorithm} does not fit the signer's RSA key")
            if key.key_size not in _RSA_BITS:
                raise SignatureError(f"RSA keys of {key.key_size} bits are not accepted")
            key.verify(signed.signature, signed.signing_string, _PKCS1V15, _SHA256)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if signed.scheme != "rfc9421" or signed.algorithm not in ("ed25519", ""):
                raise SignatureError(f"algorithm {algorithm} does not fit the signer's Ed25519 key")
            key.verify(signed.signature, signed.signing_string)
        else:
            raise SignatureError("the signer's key is neither RSA nor Ed25519")
    except InvalidSignature:
        raise SignatureError("signature does not verify with the signer's key") from None


def _parse_cavage(request: _Request, window: _Window) -> SignedRequest:
    fields, params = request.fields, dict[str, str]()
    value, pos, end = fields["signature"], 0, len(fields["signature"])
    while pos < end:
        match = _CAVAGE_PARAM.match(value, pos)
        if match is None or match.end() == pos:
            raise SignatureError("Signature header is malformed")
        name, quoted, number = match.groups()
        if name in params:
            raise SignatureError(f"Signature header repeats {name}")
        params[name] = quoted if quoted is not None else number
        pos = match.end()
    key_id = params.get("keyId", "")
    if not key_id:
        raise SignatureError("Signature has no keyId")
    # cavage-12: no algorithm means "derive it from the key", which for us is RSA-SHA256.
    algorithm = params.get("algorithm", "")
    if algorithm and algorithm not in _CAVAGE_ALGORITHMS:
        raise SignatureError(f"algorithm {algorithm[:40]} is not supported (use rsa-sha256)")
    covered = params.get("headers", "").lower().split()
    if len(covered) > MAX_COVERED or len(set(covered)) != len(covered):
        raise SignatureError("Signature headers list is too long or repeats a header")
    for required in ("(request-target)", "host", "date"):
        if required not in covered:
            raise SignatureError(f"{required} must be signed")
    if _authority(fields.get("host", ""), request.scheme) != request.authority:
        raise SignatureError(f"signed Host is not this server (expected {request.authority})")
    date = fields.get("date", "")
    if len(date) > _MAX_DATE_LENGTH:
        raise SignatureError(f"Date header is too long (over {_MAX_DATE_LENGTH} characters)")
    created, timestamp = _http_date(date)
    _check_time(timestamp, "Date", window)
    for name in ("created", "expires"):
        if name in params and not _INTEGER.fullmatch(params[name]):
            raise SignatureError(f"Signature {name} is not an integer")
    if "created" in params:
        _check_time(int(params["created"]), "created", window)
    if "expires" in params:
        _check_expires(int(params["expires"]), window[0])
    return SignedRequest(
        key_id=key_id,
        scheme="cavage",
        algorithm=algorithm,
        covered=tuple(covered),
        created=created,
        signature=_signature_bytes(_b64decode(params.get("signature", ""), "signature")),
        signing_string=_cavage_string(request, covered, params),
    )


def _parse_rfc9421(request: _Request, window: _Window) -> SignedRequest:
    inputs = _sf_dictionary(request.fields["signature-input"], "Signature-Input")
    signatures = _sf_dictionary(request.fields.get("signature", ""), "Signature")
    if not inputs:
        raise SignatureError("Signature-Input is empty")
    # Several signatures are legal (e.g. one added by a proxy); the sender's comes first.
    label = next(iter(inputs))
    member, sig_member = inputs[label], signatures.get(label)
    if not isinstance(member, tuple) or not isinstance(member[0], list):
        raise SignatureError(f"Signature-Input {label} is not an inner list")
    items, params = member[0], member[1]
    if len(items) > MAX_COVERED:
        raise SignatureError(f"Signature-Input covers more than {MAX_COVERED} components")
    covered: list[str] = []
    for item in items:
        name = item[0] if isinstance(item, tuple) and not item[1] else None
        if not isinstance(name, str) or not (name in _DERIVED or _HEADER_NAME.fullmatch(name)):
            raise SignatureError("Signature-Input has an unsupported component")
        if name in covered:
            raise SignatureError(f"Signature-Input covers {name} twice")
        covered.append(name)
    if "@method" not in covered:
        raise SignatureError("@method must be signed")
    if "@target-uri" not in covered and not {"@authority", "@path"} <= set(covered):
        raise SignatureError("@target-uri (or @authority and @path) must be signed")
    if not set(params) <= _RFC9421_PARAMS:
        raise SignatureError("Signature-Input has an unknown parameter")
    created, expires = params.get("created"), params.get("expires")
    key_id, algorithm = params.get("keyid"), params.get("alg", "")
    if type(created) is not int or not (expires is None or type(expires) is int):
        raise SignatureError("Signature-Input needs integer created (and expires)")
    if not isinstance(key_id, str) or not key_id or not isinstance(algorithm, str):
        raise SignatureError("Signature-Input needs a keyid string")
    if algorithm and algorithm not in _RFC9421_ALGORITHMS:
        raise SignatureError(f"alg {algorithm[:40]} is not supported (use rsa-v1_5-sha256)")
    _check_time(created, "created", window)
    if expires is not None:
        _check_expires(expires, window[0])
    if not isinstance(sig_member, tuple) or not isinstance(sig_member[0], bytes):
        raise SignatureError(f"Signature has no byte sequence labelled {label}")
    return SignedRequest(
        key_id=key_id,
        scheme="rfc9421",
        algorithm=algorithm,
        covered=tuple(covered),
        created=datetime.fromtimestamp(created, UTC),
        signature=_signature_bytes(sig_member[0]),
        signing_string=_rfc9421_base(request, covered, params),
    )


# --- shared helpers ----------------------------------------------------------------


def _cavage_string(request: _Request, covered: list[str], params: Mapping[str, str]) -> bytes:
    lines = []
    for name in covered:
        value: str | None
        if name == "(request-target)":
            value = f"{request.method.lower()} {request.path_and_query}"
        elif name in ("(created)", "(expires)"):
            value = params.get(name[1:-1])
        elif name not in _USUAL_NAMES and (
            name.startswith("(") or not _HEADER_NAME.fullmatch(name)
        ):
            raise SignatureError("Signature covers an unsupported pseudo-header")
        else:
            value = request.fields.get(name)
        if value is None:
            raise SignatureError(f"signed header {name} is missing")
        lines.append(f"{name}: {value}")
    return _encode_lines(lines)


def _rfc9421_base(request: _Request, covered: list[str], params: ParamsType) -> bytes:
    # Derived from this server's own view (configured host), never from the sender's
    # Host header, so a signature made for another server cannot verify here.
    target, authority, scheme = request.path_and_query, request.authority, request.scheme
    path, _, query = target.partition("?")
    derived = {
        "@method": request.method,
        "@target-uri": f"{scheme}://{authority}{target}",
        "@authority": authority,
        "@scheme": scheme,
        "@path": path or "/",
        "@query": "?" + query,
        "@request-target": target,
    }
    lines = []
    for name in covered:
        value = derived.get(name) if name.startswith("@") else request.fields.get(name)
        if value is None:
            raise SignatureError(f"covered header {name} is missing")
        lines.append(f'"{name}": {value}')
    # RFC 9421 2.3: the serialisation of the parameters, which http-sf makes canonical.
    items: list[ItemType] = [(name, {}) for name in covered]
    lines.append('"@signature-params": ' + ser_innerlist((items, params)))
    return _encode_lines(lines)


def _encode_lines(lines: list[str]) -> bytes:
    text = "\n".join(lines)
    # A line break inside a value would let a sender forge extra signed lines.
    if "\r" in text or text.count("\n") != max(len(lines) - 1, 0):
        raise SignatureError("a signed value contains a line break")
    try:
        return text.encode("latin-1")  # header bytes as they came on the wire
    except UnicodeEncodeError:
        raise SignatureError("a signed value is not Latin-1 text") from None


def _header_fields(headers: Mapping[str, str]) -> dict[str, str]:
    # items() sees every field line of starlette's Headers and every differently-cased
    # key of a dict; repeated lines are joined with ", " as both specs require.
    lines: dict[str, list[str]] = {}
    for name, value in headers.items():
        lines.setdefault(name.lower(), []).append(value.strip(" \t"))
    return {name: ", ".join(values) for name, values in lines.items()}


def _authority(host: str, scheme: str) -> str:
    return host.strip().lower().removesuffix(":443" if scheme == "https" else ":80")


@lru_cache(maxsize=512)  # a sender's Date changes once a second: nearly every call hits
def _http_date(value: str) -> tuple[datetime, float]:
    """The date and its POSIX timestamp."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise SignatureError("Date header is missing or not an HTTP date") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when, when.timestamp()


def _check_time(timestamp: float, what: str, window: _Window) -> None:
    now, max_past, max_future = window
    age = now - timestamp
    if age > max_past:
        raise SignatureError(f"{what} is {int(age)} s old (the limit is {max_past} s)")
    if -age > max_future:
        raise SignatureError(f"{what} is {int(-age)} s in the future (limit {max_future} s)")


def _check_expires(expires: int, now: float) -> None:
    # Like Mastodon, forgive a little clock skew between the sender and us.
    if expires + _CLOCK_SKEW_SECONDS < now:
        raise SignatureError("signature has expired")


def _b64decode(value: str, what: str) -> bytes:
    # strict_mode refuses characters out of the alphabet (blanks and newlines too),
    # missing, leading or broken padding, and data after the padding. On Python 3.11 it
    # still takes surplus "=" after a complete group ("QUJD==" reads as "QUJD"): the
    # bytes are the same, so no signature or digest can differ by it.
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except ValueError:
        raise SignatureError(f"{what} is not valid base64") from None


def _signature_bytes(signature: bytes) -> bytes:
    if not 0 < len(signature) <= _MAX_SIGNATURE_BYTES:
        raise SignatureError("signature is empty or too long")
    return signature


def _reject_duplicate(key: str, context: str) -> None:
    raise SignatureError(f"structured header repeats the key {key[:40]}")


def _sf_dictionary(value: str, what: str) -> http_sf.DictionaryType:
    try:
        parsed = http_sf.parse(
            value.encode("ascii"), tltype="dictionary", on_duplicate_key=_reject_duplicate
        )
    except ValueError:  # StructuredFieldError and UnicodeEncodeError are ValueErrors
        raise SignatureError(f"{what} is not a valid structured header") from None
    if not isinstance(parsed, dict):
        raise SignatureError(f"{what} is not a dictionary")
    return parsed


def _check_digest(value: str, body: bytes) -> None:
    digests: dict[str, bytes] = {}
    for member in value.split(","):
        algorithm, sep, encoded = member.strip().partition("=")
        if not sep or algorithm.lower() in digests:
            raise SignatureError("Digest header is malformed")
        digests[algorithm.lower()] = _b64decode(encoded, "Digest")
    _match_digests(digests, body, "Digest")


def _check_content_digest(value: str, body: bytes) -> None:
    digests: dict[str, bytes] = {}
    for algorithm, member in _sf_dictionary(value, "Content-Digest").items():
        if not isinstance(member, tuple) or not isinstance(member[0], bytes):
            raise SignatureError("Content-Digest values must be byte sequences")
        digests[algorithm] = member[0]
    _match_digests(digests, body, "Content-Digest")


def _match_digests(digests: Mapping[str, bytes], body: bytes, what: str) -> None:
    if "sha-256" not in digests:
        raise SignatureError(f"{what} has no SHA-256 value (the only algorithm accepted)")
    # A SHA-512 sent alongside is checked too: a sender whose two digests disagree is
    # either broken or tampered with.
    for algorithm, expected in digests.items():
        hasher = _HASHES.get(algorithm)
        if hasher is not None and not hmac.compare_digest(hasher(body).digest(), expected):
            raise SignatureError(f"{what} does not match the body")
