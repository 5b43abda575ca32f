"""OPC UA secure channels for the driver: checking a ``SecurityConfig`` and applying it to a client.

Supported: policy ``None`` (mode ``None``), or policy ``Basic256Sha256``,
``Aes128Sha256RsaOaep`` or ``Aes256Sha256RsaPss`` with mode ``Sign`` or ``SignAndEncrypt`` and a
client certificate and private key (PEM or DER files). The client's ApplicationUri is taken from
the certificate's subjectAltName URI, because servers check that the two match.

With ``server_certificate`` set the server's certificate is pinned: a server presenting another
certificate cannot complete the handshake. Without it the certificate is taken from the server's
endpoint list at connect, which trusts whatever answers on that address (logged as a warning);
production configurations should pin it. The server, in turn, must trust the client certificate
(put it in the server's trust list); an untrusted client is refused with
``BadCertificateUntrusted`` and the driver raises ``DeviceUnavailable`` naming that status.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from asyncua import Client, ua
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509

from drivers.errors import ConfigurationError
from drivers.points import SecurityConfig

log = structlog.get_logger(__name__)

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}


def check_security(device: str, security: SecurityConfig) -> None:
    """Raise ``ConfigurationError`` for a policy/mode/file combination that cannot work."""
    if security.policy == "None":
        if security.mode not in ("None", ""):
            raise ConfigurationError(
                device, f"security mode {security.mode!r} needs a policy other than None"
            )
        return
    if security.policy not in POLICIES:
        raise ConfigurationError(
            device,
            f"unknown security policy {security.policy!r}; use None or one of "
            + ", ".join(sorted(POLICIES)),
        )
    if security.mode not in MODES:
        raise ConfigurationError(
            device,
            f"security policy {security.policy} needs mode Sign or SignAndEncrypt, "
            f"not {security.mode!r}",
        )
    if not security.certificate or not security.private_key:
        raise ConfigurationError(
            device, f"security policy {security.policy} needs a certificate and a private key"
        )


def _read_file(device: str, role: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(device, f"cannot read the {role} {path!r}: {exc}") from exc


def _is_pem(content: bytes) -> bool:
    return content.lstrip().startswith(b"-----")


def _properties(content: bytes) -> uacrypto.CertProperties:
    # asyncua takes bytes as DER unless told otherwise
    return uacrypto.CertProperties(content, extension="pem" if _is_pem(content) else "der")


def application_uri(device: str, certificate: bytes) -> str | None:
    """The first URI in the certificate's subjectAltName (``None`` when it has none)."""
    try:
        cert = (
            x509.load_pem_x509_certificate(certificate)
            if _is_pem(certificate)
            else x509.load_der_x509_certificate(certificate)
        )
    except ValueError as exc:
        raise ConfigurationError(device, f"the client certificate cannot be parsed: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


async def apply_security(device: str, client: Client, security: SecurityConfig) -> None:
    """Configure ``client`` for ``security`` before it connects.

    Without a pinned server certificate this asks the server for its endpoints, so it can raise
    the network errors of a connect (``OSError``, ``TimeoutError``) or ``ua.UaError`` when the
    server offers no endpoint with this policy and mode.
    """
    if security.policy == "None":
        return
    assert security.certificate and security.private_key  # check_security ran
    cert = _read_file(device, "client certificate", security.certificate)
    key = _read_file(device, "private key", security.private_key)
    server_cert = (
        _read_file(device, "server certificate", security.server_certificate)
        if security.server_certificate
        else None
    )
    uri = application_uri(device, cert)
    if uri:
        client.application_uri = uri
    if server_cert is None:
        log.warning("opcua_server_certificate_not_pinned", device=device)
    await client.set_security(
        POLICIES[security.policy],
        certificate=_properties(cert),
        private_key=_properties(key),
        server_certificate=_properties(server_cert) if server_cert else None,
        mode=MODES[security.mode],
    )
