"""Pure parts, no database: tokens and sealed values, settings from TOML and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.errors import ConfigError
from edgefleet.server.settings import load_settings
from edgefleet.server.tokens import new_token, open_signed, parse_token, seal, secret_matches


def test_token_round_trip_keeps_only_a_hash_and_rejects_other_kinds() -> None:
    token, token_id, digest = new_token("efo")
    parsed = parse_token(token, "efo")
    assert parsed is not None and parsed.id == token_id and secret_matches(parsed.secret, digest)
    assert parsed.secret not in repr(parsed) and digest != parsed.secret
    assert parse_token(token, "efe") is None
    assert parse_token(token + "x", "efo") is None


def test_sealed_value_is_refused_when_tampered_expired_or_for_another_purpose() -> None:
    key = "k" * 43
    sealed = seal(key, {"p": "dev", "sub": "dev-1", "exp": 2_000_000_000})
    assert open_signed(key, sealed, "dev", now=1_000) == {"p": "dev", "sub": "dev-1", "exp": 2_000_000_000}
    assert open_signed(key, sealed, "chal", now=1_000) is None
    assert open_signed(key, sealed, "dev", now=2_000_000_001) is None
    assert open_signed("other" * 9, sealed, "dev", now=1_000) is None
    _body, mac = sealed.split(".")
    forged = seal("x", {"p": "dev", "sub": "dev-2", "exp": 2_000_000_000}).split(".")[0]
    assert open_signed(key, f"{forged}.{mac}", "dev", now=1_000) is None
    assert open_signed(key, "garbage", "dev") is None and open_signed(key, "a.!!", "dev") is None


def test_settings_from_toml_then_env_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "server.toml"
    f.write_text('port = 9000\nhost = "0.0.0.0"\ntrusted_proxies = ["10.0.0.1"]\n')
    s = load_settings(
        f,
        {"EDGEFLEET_SERVER_PORT": "9100", "EDGEFLEET_SERVER_DB_URL": "postgresql+psycopg://u@h/db"},
        host=None,
        data_dir=tmp_path,
    )
    assert (s.port, s.host, s.trusted_proxies, s.data_dir) == (9100, "0.0.0.0", ["10.0.0.1"], tmp_path)
    assert s.database_url() == "postgresql+psycopg://u@h/db" and "u@h" not in repr(s)


def test_settings_errors_name_the_key_and_line_or_variable(tmp_path: Path) -> None:
    f = tmp_path / "server.toml"
    f.write_text('host = "x"\nport = 70000\n')
    with pytest.raises(ConfigError, match=r"port \(line 2\)"):
        load_settings(f, {})
    with pytest.raises(ConfigError, match=r"device_token_ttl \(from \$EDGEFLEET_SERVER_DEVICE_TOKEN_TTL\)"):
        load_settings(None, {"EDGEFLEET_SERVER_DEVICE_TOKEN_TTL": "1"})
    with pytest.raises(ConfigError, match="unknown field"):
        load_settings(None, {"EDGEFLEET_SERVER_PROT": "1"})


def test_renewal_message_binds_the_challenge_and_the_exact_csr() -> None:
    from edgefleet.server.api.identity import renewal_message

    m = renewal_message("chal.mac", "-----BEGIN CERTIFICATE REQUEST-----\nA\n")
    assert m.startswith(b"edgefleet-renew-v1.chal.mac.") and len(m.rsplit(b".", 1)[1]) == 64
    assert m != renewal_message("chal.mac", "-----BEGIN CERTIFICATE REQUEST-----\nB\n")
    assert m != renewal_message("other.mac", "-----BEGIN CERTIFICATE REQUEST-----\nA\n")


@pytest.mark.parametrize("good", ["fleet.example.com", "*.example.com", "localhost", "10.0.0.1", "::1", "a-b.c0"])
def test_tls_hostnames_accepted(good: str) -> None:
    from edgefleet.server.ca import check_hostnames

    assert len(check_hostnames([good])) == 1


@pytest.mark.parametrize("bad", ["", "a b", "a..b", "-a.com", "a-.com", "é.com", "a.*.com", "x" * 64 + ".com"])
def test_tls_hostnames_refused_naming_the_field(bad: str) -> None:
    from edgefleet.server.ca import check_hostnames

    with pytest.raises(ConfigError, match=r"^hostname: "):
        check_hostnames([bad])
    with pytest.raises(ConfigError, match="at least one"):
        check_hostnames([])


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u@h/db", "sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory&uri=true"]
)
def test_private_sqlite_file_leaves_non_file_databases_alone(url: str, tmp_path: Path, monkeypatch) -> None:
    from edgefleet.server.state import private_sqlite_file

    monkeypatch.chdir(tmp_path)
    private_sqlite_file(url)
    assert list(tmp_path.iterdir()) == []
