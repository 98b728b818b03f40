//! Why a TLS connection failed, in words an operator can act on. Finds rustls' error in an
//! error's source chain (S3 through object_store and reqwest, NBD through our own session).

use rustls::{CertificateError, Error as TlsError};

/// The reason, when `e` (or something it wraps) is a TLS failure; `context` (the server and
/// where its trusted CA is set) is added in brackets.
pub fn explain(e: &(dyn std::error::Error + 'static), context: &str) -> Option<String> {
    find(e).map(|tls| format!("TLS: {} ({context})", reason(tls)))
}

fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    if let Some(tls) = e.downcast_ref::<TlsError>() {
        return Some(tls);
    }
    // rustls errors travel inside (nested) io::Errors through the HTTP and NBD stacks, and an
    // io::Error's `source()` skips the error it wraps.
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if let Some(tls) = find(inner) {
            return Some(tls);
        }
    }
    e.source().and_then(find)
}

fn reason(e: &TlsError) -> String {
    let TlsError::InvalidCertificate(c) = e else {
        return format!("the handshake failed: {e}");
    };
    match c {
        CertificateError::UnknownIssuer => {
            "the server's certificate is not signed by a CA this host trusts".into()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let names: Vec<String> = presented.iter().map(|p| unwrap_name(p)).collect();
            format!(
                "the server's certificate is for {} but the server was reached as {}",
                names.join(", "),
                server_name(expected)
            )
        }
        CertificateError::NotValidForName => {
            "the server's certificate does not name the host connected to".into()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the server's certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is not valid yet (check both clocks)".into()
        }
        CertificateError::Revoked => "the server's certificate is revoked".into(),
        CertificateError::Other(o) if o.to_string().contains("CaUsedAsEndEntity") => {
            "the server presents a CA certificate (basicConstraints CA:TRUE, which `openssl req \
             -x509` makes by default) as its own; give the server a certificate signed by a CA, \
             or self-signed with `-addext basicConstraints=critical,CA:FALSE`"
                .into()
        }
        other => format!("the server's certificate is refused: {other:?}"),
    }
}

fn server_name(n: &rustls::pki_types::ServerName<'_>) -> String {
    match n {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// `DnsName("a.example")` as rustls lists a certificate's names -> `a.example`.
fn unwrap_name(p: &str) -> String {
    p.split_once("(\"")
        .and_then(|(_, rest)| rest.strip_suffix("\")"))
        .unwrap_or(p)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_found_inside_io_errors() {
        let tls = TlsError::InvalidCertificate(CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let io = std::io::Error::other(inner);
        let got = explain(&io, "[s3] ca_file = /x").unwrap();
        assert_eq!(
            got,
            "TLS: the server's certificate is not signed by a CA this host trusts ([s3] ca_file = /x)"
        );
        let plain = std::io::Error::other("no");
        assert!(explain(&plain, "x").is_none());
    }
}
