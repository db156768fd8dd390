//! The checks of `SMTP_URL` and `SMTP_CA_FILE` at start.

use super::*;

const TIMEOUT: Duration = Duration::from_secs(1);

fn parse_url(url: &str) -> Result<Parsed, MailConfigError> {
    parse(url, None, TIMEOUT)
}

fn refusal(url: &str, ca_file: Option<&Path>) -> String {
    let error = parse(url, ca_file, TIMEOUT)
        .err()
        .unwrap_or_else(|| panic!("{url} accepted"))
        .to_string();
    assert!(!error.contains("hunter2"), "the password shows: {error}");
    error
}

/// A file of the test's own, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("smtp_ca_{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).expect("writing a temp file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn lettres_url_forms_give_their_tls_mode_and_port() {
    let cases = [
        ("smtp://127.0.0.1:1025", TlsMode::None, "127.0.0.1:1025"),
        ("smtp://mailpit", TlsMode::None, "mailpit:25"),
        (
            "smtp://apikey:hunter2@smtp.example.com:587?tls=required",
            TlsMode::Required,
            "smtp.example.com:587",
        ),
        ("smtp://relay?tls=required", TlsMode::Required, "relay:587"),
        (
            "smtp://relay:2525?tls=opportunistic",
            TlsMode::Opportunistic,
            "relay:2525",
        ),
        ("smtps://u:hunter2@mail:465", TlsMode::Wrapper, "mail:465"),
        ("smtps://u:p%40ss@mail", TlsMode::Wrapper, "mail:465"),
        ("SMTPS://u:p@Mail/ehlo.name", TlsMode::Wrapper, "Mail:465"),
        ("smtp://[::1]:2525", TlsMode::None, "[::1]:2525"),
        ("smtp://[::1]?tls=required", TlsMode::Required, "[::1]:587"),
    ];
    for (url, tls, address) in cases {
        let parsed = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(
            (parsed.tls, parsed.address.as_str()),
            (tls, address),
            "{url}"
        );
    }
}

#[test]
fn credentials_without_tls_are_refused_and_the_password_never_echoed() {
    for url in [
        "smtp://user:hunter2@mail:25",
        "smtp://user:hunter2@mail:587?tls=opportunistic",
    ] {
        let error = refusal(url, None);
        assert!(
            error.starts_with("SMTP_URL: credentials") && error.contains("user:***@mail"),
            "{error}"
        );
    }
    let error = refusal("smtp://user@mail:587?tls=required", None);
    assert!(error.contains("a user without a password"), "{error}");
}

#[test]
fn a_malformed_url_names_smtp_url_and_never_echoes_the_password() {
    for url in [
        "ftp://u:hunter2@mail",
        "smtp://u:hunter2@mail?tls=always",
        "smtps://u:hunter2@mail?tls=required",
        "smtp://:1025",
        "smtp://u:hunter2@mail:99999?tls=required",
        "mail.example.com:587",
    ] {
        let error = refusal(url, None);
        assert!(error.starts_with("SMTP_URL: "), "{url}: {error}");
    }
}

#[test]
fn a_ca_file_that_is_missing_or_holds_no_certificate_names_smtp_ca_file() {
    let url = "smtps://u:hunter2@mail:465";
    let missing = std::env::temp_dir().join(format!("no_such_{}.pem", uuid::Uuid::new_v4()));
    let error = refusal(url, Some(&missing));
    assert!(
        error.starts_with(&format!("SMTP_CA_FILE {}: ", missing.display())),
        "{error}"
    );
    let not_pem = TempFile::new("just some text\n");
    let error = refusal(url, Some(&not_pem.0));
    assert!(error.contains("no PEM certificate"), "{error}");
    let not_a_certificate =
        TempFile::new("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let error = refusal(url, Some(&not_a_certificate.0));
    assert!(error.starts_with("SMTP_CA_FILE "), "{error}");
}

#[test]
fn a_ca_file_is_trusted_with_tls_and_refused_without() {
    let key = rcgen::KeyPair::generate().expect("a key");
    let params = rcgen::CertificateParams::new(vec!["mail".to_owned()]).expect("params");
    let ca = TempFile::new(&params.self_signed(&key).expect("a certificate").pem());
    for url in ["smtps://u:hunter2@mail", "smtp://mail?tls=opportunistic"] {
        parse(url, Some(&ca.0), TIMEOUT).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    let error = refusal("smtp://mail:25", Some(&ca.0));
    assert!(
        error.starts_with("SMTP_CA_FILE is set, but SMTP_URL"),
        "{error}"
    );
}
