//! Authentication settings that cannot work stop the real binary at start,
//! with one line that names the setting and never shows the secret.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::auth::SECRET;

/// Kills the child if the test ends before it exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `order-service api` with `env` and returns its exit status and
/// standard error, failing if it is still running after 10 s. The database
/// URL points at a closed port: the settings must be refused before any
/// connection is attempted (which would be waited for).
fn start_api(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .arg("api")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env_remove("AUTH_JWT_SECRET")
        .env_remove("AUTH_JWT_PUBLIC_KEY_FILE")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = KillOnDrop(command.spawn().expect("starting order-service"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running 10 s after start with {env:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn a_bad_key_file_or_secret_stops_the_api_at_start_with_one_line_naming_the_setting() {
    let not_a_key = TempFile::with("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    let not_a_key_path = not_a_key.0.to_str().unwrap().to_owned();
    let holds_no_key =
        format!("error: AUTH_JWT_PUBLIC_KEY_FILE: {not_a_key_path} holds no RSA or EC");
    let cases = [
        (
            vec![("AUTH_JWT_PUBLIC_KEY_FILE", "/nonexistent/jwt.pem")],
            "error: AUTH_JWT_PUBLIC_KEY_FILE: cannot read /nonexistent/jwt.pem",
        ),
        (
            vec![("AUTH_JWT_PUBLIC_KEY_FILE", not_a_key_path.as_str())],
            holds_no_key.as_str(),
        ),
        (
            vec![
                ("AUTH_JWT_SECRET", SECRET),
                ("AUTH_JWT_PUBLIC_KEY_FILE", not_a_key_path.as_str()),
            ],
            "error: AUTH_JWT_SECRET and AUTH_JWT_PUBLIC_KEY_FILE are both set",
        ),
        (
            vec![("AUTH_JWT_SECRET", "short-secret")],
            "error: AUTH_JWT_SECRET: must be at least 32 bytes",
        ),
    ];
    for (env, expected) in cases {
        let (status, stderr) = start_api(&env);
        assert!(!status.success(), "{env:?} exited {status}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line for {env:?}: {stderr}");
        assert!(lines[0].starts_with(expected), "{env:?}: {stderr}");
        assert!(
            !stderr.contains(SECRET) && !stderr.contains("short-secret"),
            "{stderr}"
        );
    }
}

/// A file in the temporary directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn with(content: &str) -> Self {
        let path = std::env::temp_dir().join(format!("jwt-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, content).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
