"""The device's HTTP client for the fleet server: access tokens, check-in, reports, downloads that resume
and never pass the signed length, certificate renewal, and a TUF fetcher for ngclient.

Built on urllib3 (tuf depends on it already; httpx would add to the agent's footprint) with one
``PoolManager`` shared by every thread. Redirects are not followed (the bearer token goes to this server
only) and bodies are never decompressed (a download is bounded by the bytes on the wire).

Errors (from :mod:`.errors`) say what the caller does next::

    Transient  retry later: connection refused or reset, timeouts, TLS failures, 5xx, 408, 429 and 503
               (``retry_after`` from Retry-After, seconds or an HTTP date, capped at a day), a redirect,
               an answer too large or not JSON, a download cut short (its ``.part`` file stays for a
               resume), a disk that is full (``disk_full``)
    Refused    retrying cannot fix it: a 401 after one re-authentication, 403, 404, 409, 422... (reason
               ``http_<status>``, the server's ``error`` text in the message); a download whose server
               sends more than the signed length (``endless_data``) or bytes that do not hash to the
               signed sha256 (``hash_mismatch``)

Identity files: the key (PKCS#8 PEM, 0600) and certificate the enrollment wrote, and during a renewal
``KEY.new``; see :meth:`DeviceClient.renew` for the order that survives a power cut, and
:func:`recover_identity`, which every process using those files calls before reading them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json as jsonlib
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tuf.api.exceptions import DownloadError, DownloadHTTPError, SlowRetrievalError
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet import __version__
from edgefleet.agent.updater.errors import Refused, Transient
from edgefleet.durable import atomic_write_bytes, fsync_dir
from edgefleet.errors import ConfigError
from edgefleet.renewal import renewal_message

__all__ = ["CHUNK", "CheckIn", "DeviceClient", "recover_identity"]

CHUNK = 64 * 1024  # bytes read from the socket and written to disk at a time: a download's memory bound
FSYNC_EVERY = 4 << 20  # bytes appended to a download between two fsyncs
MAX_BODY = 1 << 20  # bytes: the largest answer read whole (desired state, tokens, certificates)
MAX_ERROR_BODY = 16 << 10  # bytes of an error answer read for its ``error`` text
MAX_RETRY_AFTER = 86400.0  # seconds: a longer Retry-After is taken as this (a server cannot park a device)
REFRESH_LEFT = 0.2  # a new access token is fetched when less than this fraction of its lifetime is left
PENDING = ".new"  # KEY + this: the new key of a renewal the certificate file does not hold yet


@dataclass(frozen=True)
class CheckIn:
    """One check-in: ``changed`` False on a 304 (``desired`` None), else the desired state and its ETag."""

    changed: bool
    etag: str | None
    desired: dict[str, Any] | None


@dataclass(frozen=True)
class _Token:
    value: str
    obtained: float  # clock() just before it was asked for
    lifetime: float  # seconds, the server's expires_in

    def fresh(self, now: float) -> bool:
        return now < self.obtained + self.lifetime * (1 - REFRESH_LEFT)


class DeviceClient:
    """The device's side of the fleet API, safe to share between threads.

    ``server_url`` http(s) (plain http only where the server sets ``allow_plain_http_devices``, i.e.
    tests on loopback); https is verified against ``ca_cert`` (the fleet CA) or the system CAs.
    ``timeout`` seconds bounds connecting and each read (not a whole download); ``clock`` (epoch
    seconds) decides token refreshes, certificate expiry and Retry-After dates. Raises ConfigError
    naming ``server_url`` or ``timeout``.
    """

    def __init__(
        self,
        server_url: str,
        device_id: str,
        key_path: Path,
        cert_path: Path,
        ca_cert: Path | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server_url: {server_url[:100]!r} is not an http:// or https:// URL")
        if not timeout > 0:
            raise ConfigError(f"timeout: {timeout} seconds; expected more than 0")
        self.base = server_url.rstrip("/")
        self._origin = (parts.scheme, parts.netloc.lower())
        self._path_prefix = parts.path.rstrip("/")
        self.device_id = device_id
        self.key_path, self.cert_path = Path(key_path), Path(cert_path)
        self._clock = clock
        # One lock for the identity: the token, and a renewal as a whole (other threads wait for their token
        # while the key and certificate change). Re-entrant: a renewal asks for tokens itself.
        self._lock = threading.RLock()
        self._token: _Token | None = None
        self._renewing = False  # between steps 1 and 4 of renew(): the pending key is this thread's own
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=4, retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout),
            cert_reqs="CERT_REQUIRED", ca_certs=str(ca_cert) if ca_cert else None,
        )
        self._headers = {"User-Agent": f"edgefleet-agent/{__version__}", "Accept-Encoding": "identity"}
        recover_identity(self.key_path, self.cert_path)

    @property
    def pending_key_path(self) -> Path:
        """Where a renewal keeps the new key until the certificate file holds its certificate."""
        return self.key_path.with_name(self.key_path.name + PENDING)

    def close(self) -> None:
        self._pool.clear()

    # tokens ----------------------------------------------------------------------------------------

    def token(self) -> str:
        """A device access token: the cached one while more than 20% of its lifetime is left, else a new one
        (challenge signed with the device key). Raises Transient, or Refused when the server rejects the
        key (revoked, unknown: re-enroll)."""
        with self._lock:
            t = self._token
            if t is None or not t.fresh(self._clock()):
                t = self._token = self._authenticate()
            return t.value

    def drop_token(self, value: str | None = None) -> None:
        """Forget the cached token (only if it is still ``value``, when given: another thread may have
        fetched a newer one)."""
        with self._lock:
            if self._token is not None and value in (None, self._token.value):
                self._token = None

    def _authenticate(self) -> _Token:
        """A token for the key on disk. When the server rejects that key and a renewal's pending key is
        there, the server took that renewal but its answer was lost: finish it (see :meth:`renew`)."""
        recover_identity(self.key_path, self.cert_path)
        try:
            token = self._token_for(_load_key(self.key_path))
        except Refused as e:
            if e.reason != "http_401" or not self.pending_key_path.exists():
                raise
        else:
            if not self._renewing and self.pending_key_path.exists():
                self._discard_pending()  # the server took the current key: it never certified the pending one
            return token
        new = _load_key(self.pending_key_path)
        self._token = self._token_for(new)
        self._complete_renewal(new)
        return self._token_for(new)

    def _token_for(self, key: ec.EllipticCurvePrivateKey) -> _Token:
        start = self._clock()
        ch = _field(self._json("POST", "/api/v1/device-auth/challenge", {"device_id": self.device_id}), "challenge")
        body = {"device_id": self.device_id, "challenge": ch, "signature": _sign(key, ch.encode())}
        out = self._json("POST", "/api/v1/device-auth/token", body)
        try:
            lifetime = float(out["expires_in"])
        except (KeyError, TypeError, ValueError) as e:
            raise Transient("device-auth/token: the answer has no expires_in", "bad_response") from e
        return _Token(_field(out, "access_token"), start, lifetime)

    # requests --------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        accept: Collection[int] = (),
    ) -> urllib3.HTTPResponse:
        """``method path`` (a path on this server, or a URL of the same origin) with the access token; a 401
        drops the token and retries once. Returns the response for 2xx, 304 and the statuses in
        ``accept``; ``stream``: unread (the caller reads and releases it), else read whole (at most
        :data:`MAX_BODY` bytes). Raises Transient or Refused (see the module docstring)."""
        return self._call(method, path, body=body, json=json, headers=headers, stream=stream, accept=accept)

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        accept: Collection[int] = (),
        auth: bool = True,
    ) -> urllib3.HTTPResponse:
        resp = self._send(method, path, body=body, json=json, headers=headers, auth=auth)
        ok = 200 <= resp.status < 300 or resp.status == 304 or resp.status in accept
        if not ok:
            raise self._failure(method, path, resp)
        return resp if stream else self._whole(method, path, resp)

    def _send(
        self, method: str, path: str, *, body: bytes | None = None, json: Any = None,
        headers: Mapping[str, str] | None = None, auth: bool = True,
    ) -> urllib3.HTTPResponse:
        """The unread response, whatever its status, after one retry with a new token on a 401. Raises
        Transient for network errors and Refused for a URL of another origin."""
        url = self._url(path)
        hdrs = dict(self._headers)
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        for attempt in (1, 2):
            token = self.token() if auth else None
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            resp = self._urlopen(method, url, body, hdrs)
            if resp.status != 401 or token is None or attempt == 2:
                return resp
            _discard(resp)
            self.drop_token(token)
        raise AssertionError("unreachable")

    def _urlopen(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> urllib3.HTTPResponse:
        try:
            resp = self._pool.request(method, url, body=body, headers=headers, preload_content=False,
                                      decode_content=False, redirect=False, retries=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _network_error(f"{method} {_shown(url)}", e) from e
        assert isinstance(resp, urllib3.HTTPResponse)  # what urllib3's own connection pools return
        return resp

    def _url(self, path: str) -> str:
        if path.startswith("/"):
            return self.base + path
        parts = urlsplit(path)
        if (parts.scheme, parts.netloc.lower()) != self._origin or not parts.path.startswith(self._path_prefix):
            raise Refused(f"{_shown(path)}: not on the fleet server {self.base}; the device sends its token there "
                          "only", "other_origin")
        return path

    def _whole(self, method: str, path: str, resp: urllib3.HTTPResponse) -> urllib3.HTTPResponse:
        """``resp`` read into memory (at most MAX_BODY bytes), as a response whose ``data`` works."""
        try:
            data = _read_bounded(resp, MAX_BODY)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            _discard(resp)
            raise _network_error(f"{method} {_shown(path)}", e) from e
        if data is None:
            _discard(resp)
            raise Transient(f"{method} {_shown(path)}: the answer is larger than {MAX_BODY} bytes", "body_too_large")
        resp.release_conn()
        return urllib3.HTTPResponse(body=io.BytesIO(data), headers=resp.headers, status=resp.status,
                                    reason=resp.reason, preload_content=True, decode_content=False)

    def _failure(self, method: str, path: str, resp: urllib3.HTTPResponse) -> Transient | Refused:
        status = resp.status
        try:
            raw = _read_bounded(resp, MAX_ERROR_BODY) or b""
        except (urllib3.exceptions.HTTPError, OSError):
            raw = b""
        _discard(resp)
        text = _error_text(raw)
        msg = f"{method} {_shown(path)}: HTTP {status}" + (f": {text}" if text else "")
        reason = f"http_{status}"
        if status in (408, 429) or status >= 500:
            return Transient(msg, reason, _retry_after(resp.headers.get("retry-after"), self._clock()))
        if 300 <= status < 400:
            return Transient(f"{msg} (redirects are not followed)", reason)
        return Refused(msg, reason)

    def _json(self, method: str, path: str, body: Any = None, *, auth: bool = False) -> dict[str, Any]:
        resp = self._call(method, path, json=body, auth=auth)
        try:
            out = jsonlib.loads(resp.data)
        except ValueError as e:
            raise Transient(f"{method} {path}: the answer is not JSON", "bad_response") from e
        if not isinstance(out, dict):
            raise Transient(f"{method} {path}: the answer is not a JSON object", "bad_response")
        return out

    # check-in and reports --------------------------------------------------------------------------

    def check_in(self, etag: str | None) -> CheckIn:
        """GET the desired state, sending ``etag`` (the last one seen) as If-None-Match. Raises Transient or
        Refused."""
        path = f"/api/v1/devices/{quote(self.device_id, safe='')}/desired"
        resp = self._call("GET", path, headers={"If-None-Match": etag} if etag else None)
        new_etag = resp.headers.get("etag") or etag
        if resp.status == 304:
            return CheckIn(False, new_etag, None)
        try:
            desired = jsonlib.loads(resp.data)
        except ValueError as e:
            raise Transient(f"GET {path}: the desired state is not JSON", "bad_response") from e
        if not isinstance(desired, dict):
            raise Transient(f"GET {path}: the desired state is not a JSON object", "bad_response")
        return CheckIn(True, new_etag, desired)

    def report(self, body: dict[str, Any]) -> None:
        """POST a report (agent version, hardware profile, running models, events). Raises Transient, or
        Refused (422 naming the field the server rejected)."""
        self._call("POST", f"/api/v1/devices/{quote(self.device_id, safe='')}/reports", json=body)

    # downloads -------------------------------------------------------------------------------------

    def download(
        self,
        url_path: str,
        dest: Path,
        length: int,
        expected_sha256: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Download ``url_path`` into the staging file ``dest`` until it holds exactly ``length`` bytes (the
        signed length); returns the bytes received in this call.

        Resumes with ``Range: bytes=N-`` from dest's size; a 200 to that (Range ignored) starts again from
        0; a file longer than ``length`` is emptied first; a file already ``length`` bytes long makes no
        request. Never writes past ``length``: a server that sends more is Refused ``endless_data`` with
        exactly ``length`` bytes on disk. Appends in :data:`CHUNK` pieces, fsyncs every
        :data:`FSYNC_EVERY` bytes and at the end. ``expected_sha256``: a complete file that does not hash
        to it is emptied and Refused ``hash_mismatch``. ``progress(bytes_on_disk, length)`` after each
        piece. Raises Transient (network, a cut, a 5xx, ``disk_full`` naming the path; what arrived
        stays for a resume) or Refused."""
        if length < 0:
            raise ValueError(f"length: {length}; expected 0 or more")
        dest = Path(dest)
        try:
            f = io.FileIO(os.open(dest, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        except OSError as e:
            raise _disk_error(dest, e) from e
        with f:
            have, digest = _resume_point(f, dest, length)
            received = 0
            if have < length:
                received, digest = self._receive(url_path, f, dest, have, length, digest, progress)
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
                _restart(f)
                raise Refused(f"{dest}: {_shown(url_path)} does not hash to the signed sha256 {expected_sha256}",
                              "hash_mismatch")
        return received

    def _receive(
        self, url_path: str, f: io.FileIO, dest: Path, have: int, length: int, digest: Any,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[int, Any]:
        """Fetch bytes ``have..length`` of ``url_path`` and append them to ``f``: (bytes received, the sha256
        of the whole file)."""
        where = f"GET {_shown(url_path)}"
        resp = self._call("GET", url_path, headers={"Range": f"bytes={have}-"} if have else None, stream=True,
                          accept=(416,))
        try:
            if resp.status == 416:
                _restart(f)
                raise Transient(f"{where}: the server cannot serve from byte {have} (416); starting again from 0",
                                "range_not_satisfiable")
            if resp.status == 206:
                if _range_start(resp.headers.get("content-range")) != have:
                    raise Transient(f"{where}: asked for bytes {have}-, got Content-Range "
                                    f"{resp.headers.get('content-range')!r}", "bad_range")
            elif resp.status != 200:
                raise Transient(f"{where}: unexpected HTTP {resp.status} for a download", f"http_{resp.status}")
            elif have:
                digest = _restart(f)  # the server ignored Range: its body starts at byte 0
                have = 0
            return self._copy(resp, f, dest, where, have, length, digest, progress), digest
        finally:
            _discard(resp)

    def _copy(
        self, resp: urllib3.HTTPResponse, f: io.FileIO, dest: Path, where: str, have: int, length: int,
        digest: Any, progress: Callable[[int, int], None] | None,
    ) -> int:
        """Append the body to ``f`` until the file holds ``length`` bytes; returns the bytes appended."""
        received = unsynced = 0
        try:
            while have < length:
                try:  # one byte more than is missing: a longer body shows itself without being written
                    chunk = resp.read(min(CHUNK, length - have + 1), decode_content=False)
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    raise _network_error(f"{where}: cut after {have} of {length} bytes", e) from e
                if not chunk:
                    raise Transient(f"{where}: the server stopped after {have} of {length} bytes",
                                    "download_interrupted")
                take = chunk[: length - have]
                _write_all(f, dest, take)
                digest.update(take)
                have += len(take)
                received += len(take)
                unsynced += len(take)
                if unsynced >= FSYNC_EVERY:
                    _fsync(f, dest)
                    unsynced = 0
                if progress is not None:
                    progress(have, length)
                if len(chunk) > len(take):
                    raise _endless(where, dest, length)
            if _more_follows(resp):
                raise _endless(where, dest, length)
        except BaseException:
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())  # what arrived stays, durable, for a resume
            raise
        _fsync(f, dest)
        return received

    # certificate renewal ---------------------------------------------------------------------------

    def renew(self, days_before: float) -> bool:
        """Renew the certificate when it expires in less than ``days_before`` days; returns whether it did.

        A new P-256 key and its CSR; a renewal challenge (``purpose: renew``, with the access token); the
        challenge and CSR signed with the CURRENT key (:func:`edgefleet.renewal.renewal_message`: the proof
        of possession); the new certificate. Files, in this order, so that a power cut at any instant
        leaves a (key, certificate) pair that works:

        1. the new key to ``KEY.new`` (0600, atomic): the old pair is untouched;
        2. the server certifies the new key (from here it accepts only the new key's signatures);
        3. the certificate file replaced atomically: it now matches ``KEY.new``;
        4. ``KEY.new`` renamed over ``KEY``; the cached token dropped.

        After a cut :func:`recover_identity` (every start) finishes 3-4 when the certificate already
        matches ``KEY.new``. A cut between 1 and 3 leaves the old pair, which works until the server has
        certified the new key; if it had, the old key's next sign-in is refused, the pending key is tried,
        and the lost renewal is finished by renewing that same key (:meth:`_authenticate`); a pending key
        the server never certified is deleted when the current key next signs in.

        Expiry: the server does not check a certificate's dates when a device signs in (it trusts the key
        it holds for the device), so a device offline past expiry still gets a token over HTTP and renews
        here; only what checks the certificate itself (Mosquitto's client-certificate check) refuses it
        meanwhile. A revoked device (403) or one whose key the server no longer knows (both its keys
        refused) cannot renew: the way back is a new enrollment token and ``edgefleet agent enroll
        --force``. Raises Transient or Refused."""
        with self._lock:
            left = _load_cert(self.cert_path).not_valid_after_utc.timestamp() - self._clock()
            if left >= days_before * 86400:
                return False
            if self.pending_key_path.exists():  # an earlier attempt's: finished or deleted by a new sign-in
                self._token = None
            self.token()
            current = _load_key(self.key_path)
            new = ec.generate_private_key(ec.SECP256R1())
            self._renewing = True
            try:
                self._stage_key(new)
                try:
                    pem = self._request_certificate(current, new)
                except Refused:
                    self._discard_pending()  # the server answered no: it did not take the new key
                    raise
                self._write_cert(pem)
                self._commit_key()
            finally:
                self._renewing = False
            return True

    def _discard_pending(self) -> None:
        self.pending_key_path.unlink(missing_ok=True)
        fsync_dir(self.pending_key_path.parent)

    def _stage_key(self, key: ec.EllipticCurvePrivateKey) -> Path:
        """Step 1: the new key to ``KEY.new``, 0600 whatever the umask, atomically and durably."""
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            atomic_write_bytes(self.pending_key_path, pem, mode=0o600)
        except OSError as e:
            raise _disk_error(self.pending_key_path, e) from e
        return self.pending_key_path

    def _request_certificate(self, current: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey) -> str:
        """Step 2: a certificate for ``new``, proving possession of ``current`` (the key the server holds).
        Returns its PEM; the cached token is dead afterwards (the serial changed) and dropped."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)]))
            .sign(new, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        ch = _field(self._json("POST", "/api/v1/device-auth/challenge",
                               {"device_id": self.device_id, "purpose": "renew"}, auth=True), "challenge")
        body = {"csr": csr, "challenge": ch, "signature": _sign(current, renewal_message(ch, csr))}
        out = self._json("POST", f"/api/v1/devices/{quote(self.device_id, safe='')}/certificate", body, auth=True)
        self._token = None
        pem = _field(out, "certificate")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as e:
            raise Transient("renewal: the server's certificate is not PEM", "bad_response") from e
        if _public(cert.public_key()) != _public(new.public_key()):
            raise Transient("renewal: the server's certificate is not for the new key", "bad_response")
        return pem

    def _write_cert(self, pem: str) -> None:
        """Step 3: the certificate file replaced atomically (0600, like the enrollment's)."""
        try:
            atomic_write_bytes(self.cert_path, pem.encode(), mode=0o600)
        except OSError as e:
            raise _disk_error(self.cert_path, e) from e

    def _commit_key(self) -> None:
        """Step 4: ``KEY.new`` becomes ``KEY``; the cached token is dropped."""
        os.replace(self.pending_key_path, self.key_path)
        fsync_dir(self.key_path.parent)
        self._token = None

    def _complete_renewal(self, key: ec.EllipticCurvePrivateKey) -> None:
        """The server certified ``key`` (the pending one) but the certificate never reached the disk: get a
        certificate for the same key (its own proof), then steps 3 and 4."""
        self._write_cert(self._request_certificate(key, key))
        self._commit_key()

    # TUF -------------------------------------------------------------------------------------------

    def tuf_fetcher(self) -> FetcherInterface:
        """A fetcher for ``tuf.ngclient.Updater`` that downloads through this client (token, TLS, pool)."""
        return _Fetcher(self)


class _Fetcher(FetcherInterface):
    """ngclient's one-method fetcher. HTTP errors are DownloadHTTPError with the status (ngclient's root
    walk stops on 403/404), timeouts SlowRetrievalError, everything else DownloadError; ngclient itself
    bounds the length."""

    def __init__(self, client: DeviceClient) -> None:
        self.client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self.client._send("GET", url)
        except Transient as e:
            raise (SlowRetrievalError if e.reason == "timeout" else DownloadError)(str(e)) from e
        except Refused as e:
            raise DownloadError(str(e)) from e
        if resp.status != 200:
            status = resp.status
            err = self.client._failure("GET", url, resp)
            raise DownloadHTTPError(str(err), status)
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: urllib3.HTTPResponse) -> Iterator[bytes]:
        try:
            while chunk := resp.read(CHUNK, decode_content=False):
                yield chunk
        except urllib3.exceptions.TimeoutError as e:
            raise SlowRetrievalError(str(e)) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise DownloadError(f"{resp.geturl() or 'download'}: cut: {e}") from e
        finally:
            _discard(resp)


# identity files ------------------------------------------------------------------------------------


def recover_identity(key_path: Path, cert_path: Path) -> None:
    """Finish a renewal cut after its certificate was written (step 3 of :meth:`DeviceClient.renew`): when
    ``KEY.new`` matches the certificate, rename it over ``KEY``. A pending key that does not match is
    left for the next sign-in or renewal to resolve (only the server knows whether it took it). Also
    removes temp files a cut atomic write left. No network; call before reading the key and certificate."""
    key_path, cert_path = Path(key_path), Path(cert_path)
    for name in (key_path.name, key_path.name + PENDING, cert_path.name):
        for tmp in key_path.parent.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    pending = key_path.with_name(key_path.name + PENDING)
    if not pending.exists():
        return
    try:
        new = _load_key(pending)
    except Refused:
        return  # unreadable: leave it to a person (atomic writes never leave half a key)
    try:
        matches = _public(_load_cert(cert_path).public_key()) == _public(new.public_key())
    except (Refused, OSError):
        return
    if matches:
        os.chmod(pending, 0o600)  # a secret: 0600 whatever wrote it
        os.replace(pending, key_path)
        fsync_dir(key_path.parent)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The device key (PEM PKCS#8, EC P-256). Raises Refused (reason ``identity``) when it is missing or
    unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Refused(f"{path}: cannot read the device key: {e.strerror or e}", "identity") from e
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        raise Refused(f"{path}: not a PEM private key; re-enroll with `edgefleet agent enroll --force`",
                      "identity") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise Refused(f"{path}: the device key must be EC P-256", "identity")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise Refused(f"{path}: cannot read the device certificate: {e.strerror or e}", "identity") from e
    except ValueError as e:
        raise Refused(f"{path}: not a PEM certificate; re-enroll with `edgefleet agent enroll --force`",
                      "identity") from e


def _public(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


# helpers -------------------------------------------------------------------------------------------


def _field(out: dict[str, Any], name: str) -> str:
    value = out.get(name)
    if not isinstance(value, str) or not value:
        raise Transient(f"the server's answer has no {name}", "bad_response")
    return value


def _shown(url: str) -> str:
    """A URL or path for a message: without a query string (nothing secret goes there, but keep it short)."""
    return url.split("?", 1)[0][:300]


def _network_error(what: str, e: BaseException) -> Transient:
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return Transient(f"{what}: cannot connect: {e}", "connect")
    if isinstance(e, urllib3.exceptions.TimeoutError):
        return Transient(f"{what}: timed out: {e}", "timeout")
    if isinstance(e, urllib3.exceptions.SSLError):
        return Transient(f"{what}: TLS: {e}", "tls")
    return Transient(f"{what}: {e}", "network")


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now`` (a number or an HTTP date), 0 to MAX_RETRY_AFTER; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _error_text(raw: bytes) -> str:
    try:
        body = jsonlib.loads(raw)
    except ValueError:
        body = None
    text = body.get("error") if isinstance(body, dict) else None
    if not isinstance(text, str):
        text = raw.decode("utf-8", "replace").strip().splitlines()[0] if raw.strip() else ""
    return text[:300]


def _read_bounded(resp: urllib3.HTTPResponse, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` bytes (then only limit + 1 bytes were read)."""
    parts, size = [], 0
    while chunk := resp.read(min(CHUNK, limit + 1 - size), decode_content=False):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(parts)


def _discard(resp: urllib3.HTTPResponse) -> None:
    """Done with ``resp``: its connection goes back to the pool when the body was read to its end, else it
    is closed (unread bytes would be taken for the next answer; an endless body is never drained)."""
    try:
        if not resp.closed:
            resp.close()
    except (urllib3.exceptions.HTTPError, OSError):
        pass
    resp.release_conn()


def _more_follows(resp: urllib3.HTTPResponse) -> bool:
    """After the signed length: does the server still send? An exact Content-Length ends here without a
    read; otherwise one byte is tried (a read error or timeout here counts as the end)."""
    if resp.length_remaining == 0:
        return False
    try:
        return bool(resp.read(1, decode_content=False))
    except (urllib3.exceptions.HTTPError, OSError):
        return False


def _endless(where: str, dest: Path, length: int) -> Refused:
    return Refused(f"{where}: the server sent more than the signed {length} bytes; kept {length} in {dest}",
                   "endless_data")


def _resume_point(f: io.FileIO, dest: Path, length: int) -> tuple[int, Any]:
    """The bytes already in ``f`` and their sha256 (a file longer than ``length`` is emptied first)."""
    digest = hashlib.sha256()
    try:
        have = os.fstat(f.fileno()).st_size
        if have > length:
            return 0, _restart(f)
        f.seek(0)
        while block := f.read(CHUNK):
            digest.update(block)
        if f.tell() != have:
            raise OSError(f"read {f.tell()} bytes, expected {have}")
    except OSError as e:
        raise _disk_error(dest, e) from e
    return have, digest


def _restart(f: io.FileIO) -> Any:
    """Empty ``f`` (durably) to start again from byte 0; returns a fresh sha256."""
    f.truncate(0)
    f.seek(0)
    os.fsync(f.fileno())
    return hashlib.sha256()


def _range_start(content_range: str | None) -> int | None:
    """The first byte of ``Content-Range: bytes START-END/TOTAL``, or None."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    start, _, _rest = content_range[6:].partition("-")
    return int(start) if start.strip().isdigit() else None


def _write_all(f: io.FileIO, dest: Path, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            n = f.write(view)
            if n is None:
                raise OSError("non-blocking write")
            view = view[n:]
    except OSError as e:
        raise _disk_error(dest, e) from e


def _fsync(f: io.FileIO, dest: Path) -> None:
    try:
        os.fsync(f.fileno())
    except OSError as e:
        raise _disk_error(dest, e) from e


def _disk_error(path: Path, e: OSError) -> Transient:
    return Transient(f"{path}: cannot write: {e.strerror or e}", "disk_full")
