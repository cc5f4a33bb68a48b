"""Reaching a Dask cluster started elsewhere, through the command line: ``--scheduler-file``
(the usual HPC handshake) and ``tls://`` schedulers with ``--tls-ca-file``, ``--tls-cert`` and
``--tls-key`` (a self-signed certificate authority on loopback). The scheduler and the worker
are ``dask scheduler`` and ``dask worker`` processes, as in ``tests/test_cluster.py``."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cellulus_scale.cli.main import main
from conftest import assert_one_line_error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cellulus_scale.io.ome_zarr import open_labels

BIN = Path(sys.executable).parent
WATERSHED = ("--method", "watershed", "--diameter", "16")
QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
WORKER = ["--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(folder: Path, prefix: str = "") -> dict[str, Path]:
    """A self-signed certificate authority and a certificate it signed for 127.0.0.1 (for the
    scheduler, the worker and the client alike), as PEM files: ca, cert, key."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1)}
    valid["not_valid_after"] = now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name(f"{prefix}test CA"))
        .issuer_name(_name(f"{prefix}test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: folder / f"{prefix}{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _tls_options(paths: dict[str, Path]) -> list[str]:
    return [
        "--tls-ca-file", str(paths["ca"]), "--tls-cert", str(paths["cert"]),
        "--tls-key", str(paths["key"]),
    ]  # fmt: skip


def _wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, simulated_store, run_cli) -> np.ndarray:
    """The labels of a run on the embedded local cluster."""
    out = tmp_path_factory.mktemp("connect_reference") / "local.zarr"
    result = run_cli("predict", simulated_store, out, *WATERSHED, "--workers", "1")
    assert result.returncode == 0, result.stderr
    return open_labels(out, "cellulus").data.compute()


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait(timeout=30)


def test_scheduler_file(tmp_path, simulated_store, run_cli, reference):
    scheduler_file = tmp_path / "scheduler.json"
    processes = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--scheduler-file", scheduler_file, "--host"]
            + ["127.0.0.1", "--port", "0", "--no-dashboard"],
            **QUIET,
        )
    ]
    try:
        _wait_for(scheduler_file)
        processes.append(
            subprocess.Popen(
                [BIN / "dask", "worker", "--scheduler-file", scheduler_file, *WORKER], **QUIET
            )
        )
        out = tmp_path / "out.zarr"
        result = run_cli(
            "predict", simulated_store, out, *WATERSHED, "--scheduler-file", scheduler_file
        )
    finally:
        _stop(processes)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(open_labels(out, "cellulus").data.compute(), reference)


def test_tls_scheduler_with_certificates(tmp_path, simulated_store, run_cli, reference):
    paths = make_certificates(tmp_path)
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    processes = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port"]
            + [str(port), "--no-dashboard", *_tls_options(paths)],
            **QUIET,
        )
    ]
    try:
        processes.append(
            subprocess.Popen([BIN / "dask", "worker", address, *WORKER, *_tls_options(paths)])
        )
        out = tmp_path / "out.zarr"
        result = run_cli(
            "predict", simulated_store, out, *WATERSHED, "--scheduler", address,
            *_tls_options(paths),
        )  # fmt: skip
        # the same scheduler refuses a client without certificates, or with another CA's
        plain = run_cli("predict", simulated_store, tmp_path / "a.zarr", *WATERSHED,
                        "--scheduler", address)  # fmt: skip
        stranger = make_certificates(tmp_path, prefix="other-")
        other = run_cli(
            "predict", simulated_store, tmp_path / "b.zarr", *WATERSHED, "--scheduler", address,
            *_tls_options(stranger),
        )  # fmt: skip
    finally:
        _stop(processes)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(open_labels(out, "cellulus").data.compute(), reference)
    assert_one_line_error(plain, "uses TLS", "--tls-ca-file")
    assert_one_line_error(other, "cannot reach", "signed")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_bad_connection_options(tmp_path, simulated_store, cli_runner):
    """One line naming the problem and the fix, exit code 2, before anything is written."""
    paths = make_certificates(tmp_path)
    out = tmp_path / "out.zarr"
    not_json = tmp_path / "scheduler.json"
    not_json.write_text("not json")
    cases = [
        (["--scheduler-file", tmp_path / "missing.json"], ["no such file", "dask scheduler"]),
        (["--scheduler-file", not_json], ["not a Dask scheduler file"]),
        (["--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", not_json], ["both"]),
        (["--scheduler", "tls://127.0.0.1:1", "--tls-cert", paths["cert"]], ["missing"]),
        (
            ["--scheduler", "tls://127.0.0.1:1", *_tls_options({**paths, "key": tmp_path / "k"})],
            ["--tls-key", "no such file"],
        ),
        (
            ["--scheduler", "tls://127.0.0.1:1", *_tls_options({**paths, "ca": not_json})],
            ["not a PEM certificate"],
        ),
        (
            ["--scheduler", "tls://127.0.0.1:1", *_tls_options({**paths, "key": paths["cert"]})],
            ["private key"],
        ),
        (["--scheduler", "tcp://127.0.0.1:1", *_tls_options(paths)], ["tls://"]),
        (_tls_options(paths), ["tls://"]),
    ]
    for options, words in cases:
        args = ["predict", simulated_store, out, *WATERSHED, *options]
        ran = cli_runner.invoke(main, [str(a) for a in args])
        assert ran.exception is None or isinstance(ran.exception, SystemExit), ran.output
        result = subprocess.CompletedProcess(args, ran.exit_code, ran.output, ran.stderr)
        assert_one_line_error(result, *words)
        assert not out.exists()
