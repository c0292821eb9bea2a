//! TLS settings: the certificate chain and key read from PEM files into a rustls config, and
//! the holder that lets `reload` swap them for the connections that come next.
//!
//! The crypto provider is ring, not aws-lc-rs (rustls's default): ring is a small C and assembly
//! build that `make wheel` links with zig for manylinux2014 (auditwheel passes it), while
//! aws-lc-sys is a large one whose builds under `zig cc` broke (aws-lc-rs issue 993, fixed only
//! in 2026 by its pull request 1103). Both give AES-GCM and ChaCha20-Poly1305 with the same CPU
//! acceleration on x86_64; neither links OpenSSL.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Where the certificate chain and its key are (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate first, then the intermediates that lead to the root.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the certificate or key cannot be used: told when the server starts (or reloads), not at
/// the first connection.
#[derive(Debug)]
pub struct TlsConfigError(pub String);

impl fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsConfigError {}

impl TlsConfigError {
    /// As an `io::Error`, the engine's error type; `TlsConfigError::of` finds it again.
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }

    pub fn of(err: &io::Error) -> Option<&TlsConfigError> {
        err.get_ref()?.downcast_ref()
    }
}

fn fail(message: String) -> io::Error {
    TlsConfigError(message).into_io()
}

/// The rustls config for `files`: HTTP/1.1 over ALPN, TLS 1.2 and 1.3.
fn load(files: &TlsFiles) -> io::Result<Arc<ServerConfig>> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| fail(format!("TLS: {err}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| {
            fail(match err {
                rustls::Error::InconsistentKeys(_) => format!(
                    "the key in {} does not match the certificate in {}",
                    files.key.display(),
                    files.cert.display()
                ),
                err => format!(
                    "cannot use the certificate {} with the key {}: {err}",
                    files.cert.display(),
                    files.key.display()
                ),
            })
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    fs::read(path).map_err(|err| fail(format!("cannot read the {what} {}: {err}", path.display())))
}

fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, "certificate file")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|err| fail(format!("{} is not valid PEM: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(format!(
            "{} holds no certificate (PEM, BEGIN CERTIFICATE)",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key file")?;
    // rustls reads no encrypted key, and would only say it found none.
    let text = String::from_utf8_lossy(&pem);
    if text.contains("BEGIN ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(fail(format!(
            "the key in {} is encrypted (with a passphrase): give an unencrypted key \
             (`openssl pkey -in key.pem -out plain.pem`), readable only by the server's user",
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
        fail(match err {
            pem::Error::NoItemsFound => format!(
                "{} holds no private key (PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
                path.display()
            ),
            err => format!("{} is not a valid PEM key: {err}", path.display()),
        })
    })
}

/// The config new connections get; `reload` replaces it, connections already open keep theirs.
pub struct Certs {
    files: TlsFiles,
    current: Mutex<Arc<ServerConfig>>,
}

impl Certs {
    pub fn new(files: TlsFiles) -> io::Result<Self> {
        let config = load(&files)?;
        Ok(Self {
            files,
            current: Mutex::new(config),
        })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.lock().clone()
    }

    /// Read the files again; on an error the config in use stays.
    pub fn reload(&self) -> io::Result<()> {
        let config = load(&self.files)?;
        *self.current.lock() = config;
        Ok(())
    }
}
