//! Pinned self-signed certificates for `quic://`: [`keygen`], [`TlsIdentity`], and the rustls
//! verifiers that accept exactly the peer's certificate.
//!
//! Each side has its own key pair and self-signed certificate (`hostnet-keygen DIR` writes
//! `DIR/cert.der` and `DIR/key.der`) and is given a copy of the peer's `cert.der`. A handshake
//! succeeds only if the certificate the peer presents is byte for byte the pinned one and the
//! peer proves it holds the matching key (the TLS 1.3 `CertificateVerify` signature, checked
//! with the ring provider's `verify_tls13_signature`). Names, validity dates and issuers are
//! not consulted: the pin is the whole trust decision, as with SSH host keys. TLS 1.3 only, both
//! sides authenticate (mutual TLS), ALPN `hostnet/1`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use super::error::TransportError;

/// The ALPN protocol both sides require.
pub const ALPN: &[u8] = b"hostnet/1";
/// The certificate file name [`keygen`] writes.
pub const CERT_FILE: &str = "cert.der";
/// The private key file name [`keygen`] writes (mode 0600).
pub const KEY_FILE: &str = "key.der";
/// The server name the client sends (SNI); certificates are pinned, so it is not checked.
pub(crate) const SERVER_NAME: &str = "hostnet";

/// Generates a key pair and a self-signed certificate for one side and writes them to
/// `dir/cert.der` and `dir/key.der` (PKCS#8, mode 0600), creating `dir` (mode 0700) if needed.
/// Refuses to overwrite an existing key. Returns the certificate's path; give that file to the
/// peer, which pins it.
pub fn keygen(dir: &Path) -> Result<PathBuf, TransportError> {
    let file_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| TransportError::CredentialFile { what, path, source }
    };
    super::private::create_dir(dir).map_err(file_err("key directory", dir))?;
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(TransportError::Keygen)?;
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    let mut key =
        super::private::create_new_file(&key_path).map_err(file_err("private key", &key_path))?;
    key.write_all(&certified.signing_key.serialize_der())
        .and_then(|()| key.sync_all())
        .map_err(file_err("private key", &key_path))?;
    fs::write(&cert_path, certified.cert.der().as_ref())
        .map_err(file_err("certificate", &cert_path))?;
    Ok(cert_path)
}

/// The SHA-256 of a DER certificate, in lower-case hex: how logs and humans name a pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    Sha256::digest(cert_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One side's TLS identity for `quic://`: its certificate and key, and the peer's pinned
/// certificate. Its `Debug` shows fingerprints, never the key.
pub struct TlsIdentity {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) peer: CertificateDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_sha256", &fingerprint(&self.cert))
            .field("key", &"<redacted>")
            .field("peer_sha256", &fingerprint(&self.peer))
            .finish()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|source| TransportError::CredentialFile {
        what,
        path: path.to_owned(),
        source,
    })
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

fn load_cert(what: &'static str, path: &Path) -> Result<CertificateDer<'static>, TransportError> {
    let bytes = read_file(what, path)?;
    let bad = |reason: String| TransportError::BadCredential {
        what,
        path: path.to_owned(),
        reason,
    };
    if is_pem(&bytes) {
        CertificateDer::from_pem_slice(&bytes).map_err(|e| bad(format!("PEM: {e}")))
    } else if bytes.first() == Some(&0x30) {
        Ok(CertificateDer::from(bytes))
    } else {
        Err(bad("not a DER or PEM certificate".into()))
    }
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let what = "private key";
    let bytes = read_file(what, path)?;
    let bad = |reason: String| TransportError::BadCredential {
        what,
        path: path.to_owned(),
        reason,
    };
    if is_pem(&bytes) {
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| bad(format!("PEM: {e}")))
    } else if bytes.first() == Some(&0x30) {
        PrivateKeyDer::try_from(bytes).map_err(|e| bad(e.to_owned()))
    } else {
        Err(bad("not a DER or PEM private key".into()))
    }
}

impl TlsIdentity {
    /// Builds an identity from DER bytes.
    pub fn from_der(cert: Vec<u8>, key_pkcs8: Vec<u8>, peer_cert: Vec<u8>) -> Self {
        Self {
            cert: CertificateDer::from(cert),
            key: PrivateKeyDer::Pkcs8(key_pkcs8.into()),
            peer: CertificateDer::from(peer_cert),
        }
    }

    /// Reads this side's certificate and key and the peer's certificate (DER or PEM each).
    pub fn from_files(cert: &Path, key: &Path, peer_cert: &Path) -> Result<Self, TransportError> {
        Ok(Self {
            cert: load_cert("certificate", cert)?,
            key: load_key(key)?,
            peer: load_cert("peer certificate", peer_cert)?,
        })
    }

    /// Reads `dir/cert.der` and `dir/key.der` (as written by [`keygen`]) and the peer's
    /// certificate.
    pub fn from_dir(dir: &Path, peer_cert: &Path) -> Result<Self, TransportError> {
        Self::from_files(&dir.join(CERT_FILE), &dir.join(KEY_FILE), peer_cert)
    }

    /// This side's certificate fingerprint (SHA-256 hex).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The pinned peer certificate's fingerprint (SHA-256 hex).
    pub fn peer_fingerprint(&self) -> String {
        fingerprint(&self.peer)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate, with a valid TLS 1.3 signature by its key.
#[derive(Debug)]
pub(crate) struct PinnedCert {
    pinned: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    pub(crate) fn new(pinned: CertificateDer<'static>, provider: &CryptoProvider) -> Self {
        Self {
            pinned,
            algs: provider.signature_verification_algorithms,
        }
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        // Certificates are public; a plain comparison leaks nothing worth hiding.
        if presented.as_ref() == self.pinned.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned {
                    presented: fingerprint(presented),
                    pinned: fingerprint(&self.pinned),
                })),
            )))
        }
    }
}

struct NotPinned {
    presented: String,
    pinned: String,
}

// rustls shows `CertificateError::Other` with `Debug`: make that the readable sentence.
impl fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer certificate sha256:{} is not the pinned sha256:{}",
            self.presented, self.pinned
        )
    }
}

impl std::error::Error for NotPinned {}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured (QUIC requires it).
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// rustls client configuration: our certificate for client auth, the peer's pinned.
pub(crate) fn client_config(id: &TlsIdentity) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert::new(id.peer.clone(), &provider));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// rustls server configuration: our certificate, client auth required and pinned.
pub(crate) fn server_config(id: &TlsIdentity) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert::new(id.peer.clone(), &provider));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_loadable_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let side = dir.path().join("host");
        let cert = keygen(&side).unwrap();
        assert_eq!(cert, side.join(CERT_FILE));
        let meta = fs::metadata(side.join(KEY_FILE)).unwrap();
        assert!(
            !super::super::private::readable_by_others(&meta),
            "key mode 0600"
        );
        let id = TlsIdentity::from_dir(&side, &cert).unwrap();
        assert_eq!(id.fingerprint(), id.peer_fingerprint());
        assert_eq!(id.fingerprint().len(), 64);
        assert!(!format!("{id:?}").contains("Pkcs8"));
        client_config(&id).unwrap();
        server_config(&id).unwrap();
        assert!(matches!(
            keygen(&side),
            Err(TransportError::CredentialFile { .. })
        ));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        fs::write(&junk, b"hello").unwrap();
        let err = TlsIdentity::from_files(&junk, &junk, &junk).unwrap_err();
        assert!(err.to_string().contains("not a DER or PEM"), "{err}");
        let err = TlsIdentity::from_dir(dir.path(), &junk).unwrap_err();
        assert!(err.to_string().contains("cert.der"), "{err}");
    }

    #[test]
    fn pin_compares_bytes() {
        let a = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).unwrap();
        let pin = PinnedCert::new(a.cert.der().clone(), &provider());
        pin.check(a.cert.der()).unwrap();
        let err = pin.check(b.cert.der()).unwrap_err();
        assert!(err.to_string().contains("not the pinned"), "{err}");
    }
}
