"""scripts/make_certs.py: the CA and SuperLink certificate that TLS clients accept."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509

from scripts.make_certs import DEFAULT_NAMES, FILES, main, make_certs


def test_a_tls_client_trusting_the_ca_accepts_the_server_under_each_name(tmp_path):
    names = make_certs(tmp_path, ["fl.example.org", "203.0.113.7"])
    assert names == [*DEFAULT_NAMES, "fl.example.org", "203.0.113.7"]
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == set(names)
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    with server_context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        for hostname in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_context.wrap_socket(raw, server_hostname=hostname) as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
        thread.join(timeout=10)


def test_a_complete_set_is_kept_an_incomplete_one_is_refused_and_force_replaces(tmp_path, capsys):
    make_certs(tmp_path)
    ca = (tmp_path / "ca.crt").read_bytes()
    assert main(["--out", str(tmp_path), "--san", "other.example.org"]) == 0
    assert "kept" in capsys.readouterr().out and (tmp_path / "ca.crt").read_bytes() == ca

    (tmp_path / "server.key").unlink()
    assert main(["--out", str(tmp_path)]) == 1
    assert "server.key missing" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        make_certs(tmp_path)

    assert make_certs(tmp_path, force=True) is not None
    assert all((tmp_path / f).exists() for f in FILES) and (tmp_path / "ca.crt").read_bytes() != ca
