//! The operating system's trust store, found as OpenSSL finds it: the PEM file `SSL_CERT_FILE`
//! and the directories `SSL_CERT_DIR` (colon-separated) when either is set, else the first
//! distribution bundle that exists (Debian's `/etc/ssl/certs/ca-certificates.crt`, Red Hat's,
//! SUSE's, Alpine's). An operator adds a corporate or TLS-inspecting proxy's CA there once, as
//! for every other program of the host.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustls::pki_types::{pem::PemObject, CertificateDer};

/// Where distributions keep their bundle, in the order OpenSSL-based tools (Go, rustls-native-certs)
/// look.
const BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The largest certificate file read (the Debian bundle is about 200 KiB).
const MAX_FILE: u64 = 16 << 20;

/// Where this host's trust store is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SystemTrust {
    /// A PEM bundle.
    pub file: Option<PathBuf>,
    /// Directories of PEM files (OpenSSL's hashed directories, or any PEM files).
    pub dirs: Vec<PathBuf>,
    /// Whether the environment chose them (`SSL_CERT_FILE`, `SSL_CERT_DIR`): a missing file is
    /// then an error, not a host without a bundle.
    pub from_env: bool,
}

impl SystemTrust {
    pub(crate) fn from_env() -> SystemTrust {
        Self::from_lookup(|k| std::env::var_os(k), |p| p.is_file())
    }

    pub(crate) fn from_lookup(
        get: impl Fn(&str) -> Option<OsString>,
        exists: impl Fn(&Path) -> bool,
    ) -> SystemTrust {
        let file = get("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
        let dirs: Vec<PathBuf> = get("SSL_CERT_DIR")
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        if file.is_some() || !dirs.is_empty() {
            return SystemTrust { file, dirs, from_env: true };
        }
        let file = BUNDLES.iter().map(Path::new).find(|p| exists(p)).map(Path::to_path_buf);
        SystemTrust { file, dirs, from_env: false }
    }

    /// Every certificate of the store, each once.
    pub(crate) fn certificates(&self) -> Result<Vec<CertificateDer<'static>>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut add = |certs: Vec<CertificateDer<'static>>| {
            for c in certs {
                if seen.insert(c.as_ref().to_vec()) {
                    out.push(c);
                }
            }
        };
        if let Some(file) = &self.file {
            match read_pem(file) {
                Ok(certs) => add(certs),
                Err(e) if !self.from_env => tracing::debug!("the system trust store: {e:#}"),
                Err(e) => return Err(e.context("reading SSL_CERT_FILE")),
            }
        }
        for dir in &self.dirs {
            let rd = std::fs::read_dir(dir)
                .with_context(|| format!("listing SSL_CERT_DIR's {}", dir.display()))?;
            let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths.into_iter().filter(|p| p.is_file()) {
                // A directory holds other files too (an OpenSSL CRL, a README): only certificates count.
                if let Ok(certs) = read_pem(&p) {
                    add(certs);
                }
            }
        }
        Ok(out)
    }

    /// The store's place, for messages.
    pub(crate) fn describe(&self) -> String {
        let mut parts: Vec<String> = self.file.iter().map(|f| f.display().to_string()).collect();
        parts.extend(self.dirs.iter().map(|d| format!("{}/", d.display())));
        if parts.is_empty() {
            "no system trust store".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The certificates of a PEM file (other PEM sections, such as keys, are skipped).
pub(crate) fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pem = Vec::new();
    f.take(MAX_FILE).read_to_end(&mut pem).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        out.push(cert.with_context(|| format!("parsing the PEM file {}", path.display()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn the_environment_wins_over_the_distribution_bundle() {
        let t = SystemTrust::from_lookup(lookup(&[("SSL_CERT_FILE", "/corp/ca.pem")]), |_| true);
        assert_eq!(t.file, Some(PathBuf::from("/corp/ca.pem")));
        assert!(t.from_env && t.dirs.is_empty());
        let t = SystemTrust::from_lookup(lookup(&[("SSL_CERT_DIR", "/a:/b")]), |_| true);
        assert_eq!((t.file, t.dirs), (None, vec![PathBuf::from("/a"), PathBuf::from("/b")]));
        let t = SystemTrust::from_lookup(lookup(&[]), |p| p == Path::new("/etc/pki/tls/certs/ca-bundle.crt"));
        assert_eq!(t.file, Some(PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt")));
        assert!(!t.from_env);
        let t = SystemTrust::from_lookup(lookup(&[("SSL_CERT_FILE", "")]), |_| false);
        assert_eq!(t, SystemTrust::default());
    }

    #[test]
    fn files_and_directories_are_read_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // A certificate made once with openssl (any well-formed DER is enough here).
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        std::fs::write(
            &ca,
            format!("junk\n{pem}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("a.pem"), &pem).unwrap();
        std::os::unix::fs::symlink("a.pem", certs.join("abcd1234.0")).unwrap();
        std::fs::write(certs.join("README"), "not a certificate").unwrap();
        let t = SystemTrust { file: Some(ca.clone()), dirs: vec![certs.clone()], from_env: true };
        let got = t.certificates().unwrap();
        assert_eq!(got.len(), 1, "the same certificate counts once");
        assert_eq!(got[0].as_ref(), &der[..]);
        assert!(t.describe().contains("ca.pem") && t.describe().contains("certs/"));
        // A file the operator named must exist; the distribution's may not.
        let missing = SystemTrust { file: Some(dir.path().join("nope.pem")), dirs: vec![], from_env: true };
        let e = format!("{:#}", missing.certificates().unwrap_err());
        assert!(e.contains("SSL_CERT_FILE") && e.contains("nope.pem"), "{e}");
        let quiet = SystemTrust { from_env: false, ..missing };
        assert!(quiet.certificates().unwrap().is_empty());
    }
}
