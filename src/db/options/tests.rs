use super::*;

#[test]
fn the_query_is_decoded_as_sqlx_reads_it() {
    let pairs = query_pairs("postgres://u:p@h/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fa+b.pem");
    assert_eq!(
        pairs,
        vec![
            ("sslmode".into(), "verify-full".into()),
            ("sslrootcert".into(), "/etc/a b.pem".into()),
        ]
    );
}

#[test]
fn require_with_a_root_certificate_is_verified_as_verify_full() {
    let ca = std::env::temp_dir().join(format!("os-ca-{}.pem", uuid::Uuid::new_v4()));
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let url = SecretUrl::new(format!(
        "postgres://u:p@h/d?sslmode=require&sslrootcert={}",
        ca.display()
    ));
    let options = connect_options(&url);
    std::fs::remove_file(&ca).unwrap();
    let options = options.unwrap();
    assert!(matches!(
        options.connect.get_ssl_mode(),
        PgSslMode::VerifyFull
    ));
    assert_eq!(
        options.sslmode,
        "require with sslrootcert, verified as verify-full"
    );
}

#[test]
fn verify_ca_is_refused_with_the_reason() {
    let url = SecretUrl::new("postgres://u:hunter2@h/d?sslmode=verify-ca");
    let error = connect_options(&url).map(|_| ()).unwrap_err().to_string();
    assert_eq!(
        error,
        format!("DATABASE_URL (postgres://u:***@h/d?sslmode=verify-ca): {NO_VERIFY_CA}")
    );
    assert!(error.contains("use verify-full"), "{error}");
}

#[test]
fn a_file_without_a_certificate_names_the_parameter() {
    let empty = std::env::temp_dir().join(format!("os-empty-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&empty, "no PEM here\n").unwrap();
    let url = SecretUrl::new(format!(
        "postgres://u:p@h/d?sslmode=verify-full&sslrootcert={}",
        empty.display()
    ));
    let error = connect_options(&url).map(|_| ()).unwrap_err().to_string();
    std::fs::remove_file(&empty).unwrap();
    assert!(
        error.ends_with(&format!(
            "sslrootcert {}: no PEM certificate in it",
            empty.display()
        )),
        "{error}"
    );
}

#[test]
fn an_unreadable_tls_file_names_the_parameter_and_not_the_password() {
    let url =
        SecretUrl::new("postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=/nope/ca.pem");
    let error = connect_options(&url).map(|_| ()).unwrap_err().to_string();
    assert!(error.starts_with("DATABASE_URL"), "{error}");
    assert!(
        error.contains("sslrootcert /nope/ca.pem cannot be read"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
}

#[test]
fn a_bad_sslmode_is_a_configuration_error() {
    let url = SecretUrl::new("postgres://u:hunter2@h/d?sslmode=verify_full");
    let error = connect_options(&url).map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("verify_full"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}
