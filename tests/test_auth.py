"""Invitation tokens: issue, verify, every way a token is refused, the cache, the key file."""

from __future__ import annotations

import base64
import json
import os
import stat
import string

import pytest

from lightning_drift import auth
from lightning_drift.auth import (
    Claims,
    Identity,
    TokenStore,
    TokenVerifier,
    decode_token,
    issue_token,
    verify_token,
)
from lightning_drift.errors import AuthError

NOW = 1_800_000_000.0
TICKET = "endpointaddbytpljd4aipfzczqsh5op4456kcqvz5hvo5ks2qii6rwitbuhqaibab7qaaabsouqe"


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity(bytes(range(32)))


@pytest.fixture(scope="module")
def token(ident: Identity) -> str:
    return issue_token(ident, session="s1", coordinator=TICKET, now=NOW, ttl_s=3600, jti="j1")


def test_issue_and_verify_round_trip(ident: Identity, token: str) -> None:
    assert token.startswith("eyJ")
    claims = verify_token(token, ident.public_key, now=NOW + 10, session="s1")
    assert claims == Claims(
        v=1, session="s1", coordinator=TICKET, role="node", iat=NOW, exp=NOW + 3600, jti="j1"
    )


def test_claims_are_the_signed_bytes(ident: Identity, token: str) -> None:
    claims, raw, sig = decode_token(token)
    assert json.loads(raw) == {
        "v": 1,
        "session": "s1",
        "coordinator": TICKET,
        "role": "node",
        "iat": NOW,
        "exp": NOW + 3600,
        "jti": "j1",
    }
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert ident.sign(raw) == sig


def test_mode_and_relays_travel_signed_and_older_tokens_lack_them(
    ident: Identity, token: str, tmp_path
) -> None:
    relays = ("https://relay.example/", "https://other.example/")
    tok = issue_token(
        ident, session="s1", coordinator=TICKET, now=NOW, mode="internet", relays=relays
    )
    claims, raw, _ = decode_token(tok)
    assert json.loads(raw)["mode"] == "internet" and json.loads(raw)["relays"] == list(relays)
    assert verify_token(tok, ident.public_key, now=NOW).relays == relays
    # A token without them (as every token before them) verifies and says nothing.
    old = verify_token(token, ident.public_key, now=NOW + 10)
    assert (old.mode, old.relays) == ("", ())
    assert "mode" not in json.loads(decode_token(token)[1])
    # Recorded claims with and without them load back as they were.
    store = TokenStore(tmp_path)
    store.record(claims)
    store.record(old)
    assert TokenStore(tmp_path).issued() == [claims, old]
    with pytest.raises(ValueError, match="mode"):
        issue_token(ident, session="s1", coordinator=TICKET, now=NOW, mode="lan")


def test_padding_is_optional(ident: Identity, token: str) -> None:
    padded = token + "=" * (-len(token) % 4)
    assert verify_token(padded, ident.public_key, now=NOW).jti == "j1"
    assert verify_token(f"  {token}\n", ident.public_key, now=NOW).jti == "j1"


def test_every_single_character_change_is_refused(ident: Identity, token: str) -> None:
    alphabet = string.ascii_letters + string.digits + "-_"
    refused = 0
    for i, c in enumerate(token):
        # the next character of the alphabet (valid base64url) and one outside it
        nxt = alphabet[(alphabet.index(c) + 1) % len(alphabet)]
        for repl in (nxt, "+", "="):
            bad = token[:i] + repl + token[i + 1 :]
            with pytest.raises(AuthError) as err:
                verify_token(bad, ident.public_key, now=NOW, session="s1")
            msg = str(err.value)
            assert msg.startswith("malformed token") or "signed by another key" in msg, msg
            refused += 1
    assert refused == 3 * len(token)


def test_token_from_another_coordinator_is_refused(ident: Identity, token: str) -> None:
    other = Identity.generate()
    theirs = issue_token(other, session="s1", coordinator=TICKET, now=NOW)
    with pytest.raises(AuthError, match=r"signed by another key \(expected 00000000|expected "):
        verify_token(theirs, ident.public_key, now=NOW, session="s1")
    with pytest.raises(AuthError, match="signed by another key"):
        verify_token(token, other.public_key, now=NOW, session="s1")


def test_forged_claims_with_a_reused_signature_are_refused(ident: Identity, token: str) -> None:
    _, raw, sig = decode_token(token)
    forged_claims = raw.replace(b'"role":"node"', b'"role":"observer"').replace(b"s1", b"s2")
    outer = {"claims": forged_claims.decode(), "sig": base64.urlsafe_b64encode(sig).decode()}
    forged = base64.urlsafe_b64encode(json.dumps(outer).encode()).decode()
    with pytest.raises(AuthError, match="signed by another key"):
        verify_token(forged, ident.public_key, now=NOW)


def test_expired(ident: Identity) -> None:
    exp = 1_795_867_200.0  # 2026-11-28T12:00:00Z
    t = issue_token(ident, session="s1", coordinator=TICKET, now=exp - 3600, ttl_s=3600)
    with pytest.raises(AuthError, match=r"token expired at 2026-11-28T12:00:00Z"):
        verify_token(t, ident.public_key, now=exp)
    assert verify_token(t, ident.public_key, now=exp - 0.1).exp == exp


def test_allow_expired_skips_only_the_expiry(ident: Identity, token: str) -> None:
    # What a reconnecting member gets: past exp, but still signed, for the session, for the
    # role and not revoked.
    late = NOW + 7200
    assert verify_token(token, ident.public_key, now=late, allow_expired=True).jti == "j1"
    v = TokenVerifier(ident.public_key, "s1")
    with pytest.raises(AuthError, match="expired"):
        v.verify(token, now=late)
    assert v.verify(token, now=late, role="node", allow_expired=True).jti == "j1"
    assert v.verify(token, now=late + 1, allow_expired=True).jti == "j1"  # cached
    with pytest.raises(AuthError, match="expired"):
        v.verify(token, now=late + 2)  # the cache does not remember the allowance
    with pytest.raises(AuthError, match="role node"):
        v.verify(token, now=late, role="observer", allow_expired=True)
    with pytest.raises(AuthError, match="session s1"):
        TokenVerifier(ident.public_key, "s2").verify(token, now=late, allow_expired=True)
    forged = issue_token(Identity.generate(), session="s1", coordinator=TICKET, now=NOW)
    with pytest.raises(AuthError, match="another key"):
        v.verify(forged, now=late, allow_expired=True)
    v.revoke("j1")
    with pytest.raises(AuthError, match="revoked"):
        v.verify(token, now=late, allow_expired=True)


def test_issued_in_the_future(ident: Identity) -> None:
    t = issue_token(ident, session="s1", coordinator=TICKET, now=NOW + 3600)
    with pytest.raises(AuthError, match="issued in the future"):
        verify_token(t, ident.public_key, now=NOW)
    assert verify_token(t, ident.public_key, now=NOW + 3600 - 60).session == "s1"


def test_wrong_session_and_role(ident: Identity, token: str) -> None:
    with pytest.raises(AuthError, match="token is for session s1, this coordinator runs s2"):
        verify_token(token, ident.public_key, now=NOW, session="s2")
    with pytest.raises(AuthError, match="role node"):
        verify_token(token, ident.public_key, now=NOW, roles=("observer",))


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("", "empty"),
        ("drift1abc", "base64url"),
        ("eyJhIjoxfQ", "exactly the fields"),  # {"a":1}
        (base64.urlsafe_b64encode(b"not json").decode(), "bad JSON"),
        (base64.urlsafe_b64encode(b'{"claims":"{}","sig":"AA"}').decode(), "64"),
    ],
)
def test_malformed(ident: Identity, bad: str, reason: str) -> None:
    with pytest.raises(AuthError, match=f"malformed token.*{reason}"):
        verify_token(bad, ident.public_key, now=NOW)


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"v": 1}, "lack"),
        (
            {
                "v": 2,
                "session": "s",
                "coordinator": "c",
                "role": "node",
                "iat": 1,
                "exp": 2,
                "jti": "j",
            },
            "version",
        ),
        (
            {
                "v": 1,
                "session": 5,
                "coordinator": "c",
                "role": "node",
                "iat": 1,
                "exp": 2,
                "jti": "j",
            },
            "session",
        ),
        (
            {
                "v": 1,
                "session": "s",
                "coordinator": "c",
                "role": "node",
                "iat": "1",
                "exp": 2,
                "jti": "j",
            },
            "iat",
        ),
        ([1, 2], "object"),
        (
            {"v": 1, "session": "s", "coordinator": "c", "role": "node", "iat": 1, "exp": 2,
             "jti": "j", "mode": "lan"},
            "'mode' must be one of",
        ),
        (
            {"v": 1, "session": "s", "coordinator": "c", "role": "node", "iat": 1, "exp": 2,
             "jti": "j", "relays": "https://r.example"},
            "'relays' must be a list",
        ),
        (
            {"v": 1, "session": "s", "coordinator": "c", "role": "node", "iat": 1, "exp": 2,
             "jti": "j", "relays": ["https://r.example"] * 17},
            "'relays' must be a list of at most 16",
        ),
    ],
)
def test_malformed_claims_even_when_signed(ident: Identity, claims: object, reason: str) -> None:
    raw = json.dumps(claims).encode()
    outer = {"claims": raw.decode(), "sig": auth.b64url_encode(ident.sign(raw))}
    tok = auth.b64url_encode(json.dumps(outer).encode())
    with pytest.raises(AuthError, match=f"malformed token.*{reason}"):
        verify_token(tok, ident.public_key, now=NOW)


def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the signature checks of every verifier from now on (a cache hit does none)."""
    calls: list[int] = []
    real = auth.check_signature
    monkeypatch.setattr(auth, "check_signature", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_verifier_revocation_is_checked_on_every_call(
    ident: Identity, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = signature_checks(monkeypatch)
    v = TokenVerifier(ident.public_key, "s1")
    assert v.verify(token, now=NOW).jti == "j1"
    assert v.verify(token, now=NOW).jti == "j1" and len(calls) == 1  # the second from the cache
    v.revoke("j1")
    with pytest.raises(AuthError, match=r"token revoked \(jti j1\)"):
        v.verify(token, now=NOW + 1)
    v2 = TokenVerifier(ident.public_key, "s1", revoked=["j1"])
    with pytest.raises(AuthError, match="revoked"):
        v2.verify(token, now=NOW)


def test_verifier_cache_skips_the_signature_but_not_expiry(
    ident: Identity, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = signature_checks(monkeypatch)
    v = TokenVerifier(ident.public_key, "s1", ttl_s=600)
    for i in range(5):
        v.verify(token, now=NOW + i)
    assert len(calls) == 1
    # past the cache TTL the signature is checked again
    v.verify(token, now=NOW + 700)
    assert len(calls) == 2
    # a cached entry never outlives the token
    with pytest.raises(AuthError, match="expired"):
        v.verify(token, now=NOW + 3600)
    # role and session are checked on cache hits too
    v.verify(token, now=NOW + 701)
    with pytest.raises(AuthError, match="role"):
        v.verify(token, now=NOW + 702, role="observer")


def test_verifier_does_not_cache_refusals_and_is_bounded(
    ident: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = TokenVerifier(ident.public_key, "s1", maxsize=4)
    toks = [issue_token(ident, session="s1", coordinator=TICKET, now=NOW) for _ in range(10)]
    for t in toks:
        v.verify(t, now=NOW)
    calls = signature_checks(monkeypatch)
    other = issue_token(ident, session="s2", coordinator=TICKET, now=NOW)
    for _ in range(2):
        with pytest.raises(AuthError, match="session s2"):
            v.verify(other, now=NOW)
    assert len(calls) == 2  # a refusal is checked again every time
    for t in toks[-4:]:  # the cache holds the 4 most recent tokens, the refusal took no place
        v.verify(t, now=NOW)
    assert len(calls) == 2
    v.verify(toks[0], now=NOW)  # bounded: the oldest was dropped
    assert len(calls) == 3


def test_identity_file_is_private_and_stable(tmp_path) -> None:
    d = tmp_path / "state"
    a = Identity.load_or_create(d)
    path = d / "identity.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = Identity.load_or_create(d)
    assert a.seed == b.seed and a.public_hex == b.public_hex and len(a.public_hex) == 64
    assert [p.name for p in d.iterdir()] == ["identity.key"]  # no temporary left behind
    assert a.seed.hex() not in repr(a)


def test_identity_matches_nacl_signatures() -> None:
    import nacl.signing

    ident = Identity(b"\x07" * 32)
    sig = ident.sign(b"hello")
    nacl.signing.VerifyKey(ident.public_key).verify(b"hello", sig)


def test_corrupt_identity_file_is_refused(tmp_path) -> None:
    (tmp_path / "identity.key").write_text("nope")
    os.chmod(tmp_path / "identity.key", 0o600)
    with pytest.raises(AuthError, match="not an identity key"):
        Identity.load_or_create(tmp_path)


def test_token_store_persists(tmp_path, ident: Identity) -> None:
    store = TokenStore(tmp_path)
    tok = issue_token(ident, session="s1", coordinator=TICKET, now=NOW, jti="abc")
    claims = verify_token(tok, ident.public_key, now=NOW)
    store.record(claims)
    store.revoke("abc")
    again = TokenStore(tmp_path)
    assert again.issued() == [claims]
    assert again.revoked() == {"abc"}
    assert "eyJ" not in (tmp_path / "tokens.json").read_text()  # tokens themselves never stored
