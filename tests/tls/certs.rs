//! Certificates made by the test, never committed: a CA of the test's own and
//! server (or client) certificates it signs, written as PEM files into a
//! temporary folder that is removed when the fixture drops.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A CA of this test's own, its PEM file, and the folder its files live in.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM.
    pub cert_pem: String,
    /// The folder of this CA's files; removed on drop.
    pub dir: TempDir,
}

/// A certificate and its key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(name: &str) -> Self {
        let dir = TempDir::new(name);
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).expect("a self-signed CA");
        let cert_pem = cert.pem();
        std::fs::write(dir.path().join(format!("{name}-ca.pem")), &cert_pem).expect("CA file");
        Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            dir,
        }
    }

    /// The CA certificate's file.
    pub fn cert_file(&self) -> PathBuf {
        let name = self.dir.name();
        self.dir.path().join(format!("{name}-ca.pem"))
    }

    /// A server certificate for `localhost` and 127.0.0.1, signed by this CA,
    /// written as `<file_stem>.crt` and `<file_stem>.key` (key mode 0600, as
    /// Postgres requires).
    pub fn server(&self, file_stem: &str) -> Issued {
        self.issue(
            file_stem,
            vec!["localhost".into(), "127.0.0.1".into()],
            false,
        )
    }

    /// A client certificate with common name `user`, signed by this CA.
    pub fn client(&self, file_stem: &str, user: &str) -> Issued {
        self.issue_with(file_stem, Vec::new(), true, Some(user))
    }

    fn issue(&self, file_stem: &str, names: Vec<String>, client: bool) -> Issued {
        self.issue_with(file_stem, names, client, None)
    }

    fn issue_with(
        &self,
        file_stem: &str,
        names: Vec<String>,
        client: bool,
        common_name: Option<&str>,
    ) -> Issued {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(names).expect("certificate params");
        params.distinguished_name.push(
            DnType::CommonName,
            common_name.unwrap_or("localhost").to_owned(),
        );
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a signed certificate");
        let cert_path = self.dir.path().join(format!("{file_stem}.crt"));
        let key_path = self.dir.path().join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("certificate file");
        write_private(&key_path, &key.serialize_pem());
        Issued {
            cert: cert_path,
            key: key_path,
        }
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, contents.as_bytes()))
        .expect("key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("key mode");
}

/// A folder of this test's own under the system's temp dir; removed on drop,
/// so a failing test leaves nothing behind.
pub struct TempDir {
    path: PathBuf,
    name: String,
}

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("ostls_{name}_{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("a temp dir");
        Self {
            path,
            name: name.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
