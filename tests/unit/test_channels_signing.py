"""Webhook signatures: HMAC-SHA256 over f"{timestamp}.{body}", verified with a replay window."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path

from decision_router.channels.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signature_headers, verify

SECRET = "whsec-test"
BODY = '{"alert_id":"al-1","score":0.91}'
TS = 1_764_083_286


def test_sign_matches_an_independent_hmac() -> None:
    expected = hmac.new(SECRET.encode(), f"{TS}.{BODY}".encode(), hashlib.sha256).hexdigest()
    assert sign(SECRET, TS, BODY) == f"v1={expected}"
    assert sign(SECRET.encode(), TS, BODY.encode()) == sign(SECRET, TS, BODY)


def test_headers() -> None:
    headers = signature_headers(SECRET, BODY, now=TS + 0.7)
    assert headers == {TIMESTAMP_HEADER: str(TS), SIGNATURE_HEADER: sign(SECRET, TS, BODY)}
    assert TIMESTAMP_HEADER == "X-Decision-Router-Timestamp" and SIGNATURE_HEADER == "X-Decision-Router-Signature"


def test_verify_accepts_a_fresh_valid_signature() -> None:
    signature = sign(SECRET, TS, BODY)
    assert verify(SECRET, str(TS), BODY, signature, now=TS)
    assert verify(SECRET, TS, BODY.encode(), signature, now=TS + 299)
    assert verify(SECRET, TS, BODY, signature, now=TS - 299)  # a receiver clock slightly behind


def test_verify_rejects_wrong_secret_tampering_and_stale_timestamps() -> None:
    signature = sign(SECRET, TS, BODY)
    assert not verify("other-secret", TS, BODY, signature, now=TS)
    assert not verify(SECRET, TS, BODY.replace("0.91", "0.99"), signature, now=TS)
    assert not verify(SECRET, TS + 1, BODY, signature, now=TS)  # timestamp is covered by the signature
    assert not verify(SECRET, TS, BODY, signature, now=TS + 301)  # replayed after the window
    assert not verify(SECRET, TS, BODY, signature, tolerance_s=10, now=TS + 11)
    assert not verify(SECRET, TS, BODY, signature, now=TS - 301)  # from the future


def test_verify_rejects_malformed_input() -> None:
    signature = sign(SECRET, TS, BODY)
    assert not verify(SECRET, "not-a-number", BODY, signature, now=TS)
    assert not verify(SECRET, "", BODY, signature, now=TS)
    assert not verify(SECRET, TS, BODY, signature.removeprefix("v1="), now=TS)  # no version prefix
    assert not verify(SECRET, TS, BODY, "v0=" + signature[3:], now=TS)
    assert not verify(SECRET, TS, BODY, "", now=TS)


def test_verify_accepts_any_of_several_signatures() -> None:
    # e.g. a receiver that signs with the old and new secret during a rotation
    header = f"v1={'0' * 64}, {sign(SECRET, TS, BODY)}"
    assert verify(SECRET, TS, BODY, header, now=TS)


def test_the_receiver_example_in_the_docs_verifies_our_signatures() -> None:
    """docs/delivery.md shows receivers a stand-alone verify function: it must work."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "delivery.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- verify-example[^>]*-->\n```python\n(.*?)```", docs, re.S)
    assert match, "the verify example block is missing from docs/delivery.md"
    namespace: dict = {}
    exec(compile(match.group(1), "docs/delivery.md", "exec"), namespace)
    verify_request = namespace["verify_request"]
    assert len(match.group(1).strip().splitlines()) <= 20

    body = BODY.encode()
    headers = signature_headers(SECRET, body)
    assert verify_request(SECRET.encode(), headers, body)
    assert not verify_request(b"wrong", headers, body)
    assert not verify_request(SECRET.encode(), headers, body + b" ")
    stale = signature_headers(SECRET, body, now=time.time() - 301)
    assert not verify_request(SECRET.encode(), stale, body)
    assert not verify_request(SECRET.encode(), {**headers, TIMESTAMP_HEADER: "soon"}, body)
    assert not verify_request(SECRET.encode(), {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]}, body)
