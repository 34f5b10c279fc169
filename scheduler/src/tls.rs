//! The cluster's certificate authority and the TLS settings of every listener
//! and client: rustls with the ring provider, certificates made by rcgen (no
//! `openssl` binary needed).
//!
//! A TLS directory holds `ca.pem` (the cluster CA's certificate), and for a
//! scheduler `cert.pem` + `key.pem` (its own certificate, signed by the CA).
//! Every certificate the CA signs is a scheduler's: the peer listener accepts
//! any of them and nothing else. Agents and members prove themselves with
//! bearer credentials instead, over TLS that they verify against `ca.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

/// Installs rustls's ring provider as the process default, once. rustls picks
/// aws-lc-rs by default, which these builds leave out.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The CA's name. The CA certificate is re-derived from it and the key when
/// signing, so only the key must be kept secret and nothing parses X.509.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "coop");
    dn.push(DnType::CommonName, "coop cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(p)
}

/// Creates a cluster CA in `dir` (`ca.pem`, and `ca.key` readable by the owner
/// only). Refuses to overwrite one.
pub fn init_ca(dir: &Path) -> anyhow::Result<()> {
    private_dir(dir)?;
    let key_path = dir.join(CA_KEY);
    if key_path.exists() || dir.join(CA_CERT).exists() {
        bail!(
            "ca: {} already holds a CA; remove it first to make a new one",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Signs a certificate for a scheduler reachable at `hosts` (names or IP
/// addresses) with the CA in `ca_dir`, and writes it with its key and the CA
/// certificate into `out` (the scheduler's `--tls-dir`).
pub fn issue(ca_dir: &Path, name: &str, hosts: &[String], out: &Path) -> anyhow::Result<()> {
    let ca_key = std::fs::read_to_string(ca_dir.join(CA_KEY))
        .with_context(|| format!("ca: reading {}", ca_dir.join(CA_KEY).display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).context("ca: ca.key is not a key")?;
    let ca_cert = std::fs::read(ca_dir.join(CA_CERT))
        .with_context(|| format!("ca: reading {}", ca_dir.join(CA_CERT).display()))?;
    if hosts.is_empty() {
        bail!("host: name at least one address or name the scheduler is reached at");
    }
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if dns_name(h) => Ok(SanType::DnsName(h.clone().try_into()?)),
            Err(_) => bail!("host: {h:?} is neither an IP address nor a DNS name"),
        })
        .collect::<anyhow::Result<_>>()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "coop");
    dn.push(DnType::CommonName, format!("coop scheduler {name}"));
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Both: it serves clients and peers, and calls peers.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let cert = p.signed_by(&key, &issuer)?;
    private_dir(out)?;
    write_file(&out.join(KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out.join(CERT), cert.pem().as_bytes(), 0o644)?;
    if out.join(CA_CERT) != ca_dir.join(CA_CERT) {
        write_file(&out.join(CA_CERT), &ca_cert, 0o644)?;
    }
    Ok(())
}

fn dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The TLS material a scheduler serves and calls its peers with.
#[derive(Clone)]
pub struct SchedulerTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub dir: PathBuf,
}

impl std::fmt::Debug for SchedulerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SchedulerTls({})", self.dir.display())
    }
}

impl SchedulerTls {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |f: &str| {
            std::fs::read(dir.join(f)).with_context(|| {
                format!(
                    "tls-dir: reading {} (make it with coop ca issue)",
                    dir.join(f).display()
                )
            })
        };
        Ok(Self {
            ca: read(CA_CERT)?,
            cert: read(CERT)?,
            key: read(KEY)?,
            dir: dir.to_path_buf(),
        })
    }

    /// `coop dev` and a lone scheduler without `--tls-dir`: a CA of their own
    /// in `dir` (made once), and a certificate for this machine signed at every
    /// start (so that a changed listen address is covered).
    pub fn local(dir: &Path, listen: IpAddr) -> anyhow::Result<Self> {
        if !dir.join(CA_KEY).exists() {
            init_ca(dir)?;
        }
        let mut hosts = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if !listen.is_unspecified() && !listen.is_loopback() {
            hosts.push(listen.to_string());
        }
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let h = h.trim();
            if dns_name(h) {
                hosts.push(h.to_string());
            }
        }
        issue(dir, "local", &hosts, dir)?;
        Self::load(dir)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// The client listener: TLS, no client certificate (bearer credentials).
    pub fn server(&self) -> ServerTlsConfig {
        install_provider();
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }

    /// The peer listener: a certificate from the cluster CA is required, so a
    /// caller without one is refused in the handshake, before any message.
    pub fn peer_server(&self) -> ServerTlsConfig {
        self.server()
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(false)
    }

    /// The metrics endpoint's TLS (rustls directly: it is served by axum).
    pub fn rustls_server(&self) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        install_provider();
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .context("tls-dir: cert.pem")?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).context("tls-dir: key.pem")?;
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("tls-dir: cert.pem and key.pem")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    /// Calls to peers: the server verified against the CA, our certificate shown.
    pub fn peer_client(&self) -> ClientTlsConfig {
        install_provider();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// Clients (CLI, agents): verify the server against the cluster CA.
pub fn client(ca_pem: &[u8]) -> ClientTlsConfig {
    install_provider();
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

/// Creates `dir` readable by its owner only (0700), or tightens it.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// Writes `bytes` to `path` with `mode`, durably.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_scheduler_certificates_and_keeps_its_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca).unwrap();
        assert!(init_ca(&ca).is_err(), "an existing CA is never overwritten");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca), 0o700);
        let out = d.path().join("s1");
        issue(&ca, "1", &["127.0.0.1".into(), "s1.example".into()], &out).unwrap();
        assert_eq!(mode(&out.join(KEY)), 0o600);
        let t = SchedulerTls::load(&out).unwrap();
        assert_eq!(t.ca, std::fs::read(ca.join(CA_CERT)).unwrap());
        let err = issue(&ca, "2", &["not a host!".into()], &d.path().join("s2")).unwrap_err();
        assert!(err.to_string().starts_with("host:"), "{err}");
    }
}
