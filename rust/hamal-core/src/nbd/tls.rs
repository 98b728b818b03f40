//! TLS for `nbds://` (NBD_OPT_STARTTLS), with rustls. Certificates come from the URI's
//! `tls-certificates` directory in the layout qemu and libnbd use: `ca-cert.pem` to verify the
//! server, and optionally `client-cert.pem` + `client-key.pem` to authenticate the client.

use super::uri::{NbdAddress, NbdUri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io;
use std::path::Path;
use std::sync::Arc;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Client configuration and server name for a TLS NBD URI.
pub fn client(uri: &NbdUri) -> io::Result<ClientConnection> {
    let dir = uri
        .tls_certificates
        .as_deref()
        .ok_or_else(|| invalid("nbds:// needs ?tls-certificates=DIR holding ca-cert.pem".into()))?;
    let ca = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&ca).map_err(|e| invalid(format!("{}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_identity(dir)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    let name = match (&uri.tls_hostname, &uri.address) {
        (Some(n), _) => n.clone(),
        (None, NbdAddress::Tcp { host, .. }) => host.clone(),
        (None, NbdAddress::Unix(_)) => "localhost".into(),
    };
    let server = ServerName::try_from(name.clone())
        .map_err(|_| invalid(format!("bad TLS host name '{name}'")))?;
    ClientConnection::new(Arc::new(config), server).map_err(|e| invalid(e.to_string()))
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_identity(dir: &Path) -> io::Result<Option<Identity>> {
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    if !cert.exists() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
    Ok(Some((certs, key)))
}
