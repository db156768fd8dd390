//! The mailer over TLS with AUTH, against the test's own aiosmtpd server with
//! a certificate signed by the test's own CA (`tests/tls/certs.rs`), trusted
//! through `SMTP_CA_FILE`:
//!
//! - STARTTLS (`smtp://...?tls=required`) with AUTH, to a server that
//!   requires both, and implicit TLS (`smtps://`): every mail arrives once,
//!   over TLS, from the authenticated login;
//! - once the e-mail consumer runs (it started while the server was down,
//!   so its start probe let it through: `mail/stop.rs` shows the stop), a
//!   server that offers no STARTTLS (and offers AUTH in the clear), given
//!   `tls=required`, or whose certificate no trusted CA signed: no mail and
//!   no AUTH command ever reach it, and the mails wait, retried (never given
//!   up), with the reason in `last_error`; so do they when the server
//!   refuses the password (535).

use crate::certs::TestCa;
use crate::fixture::{Fixture, first_of_each_order, mail_rows};
use crate::smtp::{Behaviour, Event, ServerTls, read_events};
use crate::stack::Role;
use crate::{SETTLE, check_every_row_arrived, check_mails_name_their_orders};

/// The one login the test servers accept.
pub const USER: &str = "order-mailer";
/// Its password: it must never show in a log, an error or the server's record.
pub const PASSWORD: &str = "pw-7f3c9e-never-logged";

/// A server speaking TLS with a certificate of `ca`'s for 127.0.0.1, and
/// requiring the test's login.
pub fn tls_server(ca: &TestCa, implicit: bool) -> Behaviour {
    let issued = ca.server("smtp");
    Behaviour {
        tls: Some(ServerTls {
            implicit,
            cert: issued.cert,
            key: issued.key,
        }),
        auth: Some((USER.into(), PASSWORD.into())),
        ..Behaviour::default()
    }
}

/// The mailer's settings: `url`, and `ca` trusted.
fn mailer_env(ca: &TestCa, url: String) -> Vec<(&'static str, String)> {
    vec![
        ("SMTP_URL", url),
        ("SMTP_CA_FILE", ca.cert_file().display().to_string()),
    ]
}

/// `smtp://user:password@host?tls=required` to a server that refuses
/// everything before STARTTLS and MAIL before AUTH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailer_delivers_over_starttls_with_auth_to_a_server_requiring_both() {
    let ca = TestCa::new("smtp_starttls");
    let url = |port| format!("smtp://{USER}:{PASSWORD}@127.0.0.1:{port}?tls=required");
    let behaviour = tls_server(&ca, false);
    let f = Fixture::start_with("starttls", behaviour, true, |port| {
        mailer_env(&ca, url(port))
    })
    .await;
    delivers_each_mail_once_over_tls_as_the_login(f, "erin").await;
}

/// `smtps://user:password@host` to a server that speaks TLS from the first
/// byte and refuses MAIL before AUTH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailer_delivers_over_implicit_tls_with_auth() {
    let ca = TestCa::new("smtp_implicit");
    let url = |port| format!("smtps://{USER}:{PASSWORD}@127.0.0.1:{port}");
    let behaviour = tls_server(&ca, true);
    let f = Fixture::start_with("smtps", behaviour, true, |port| mailer_env(&ca, url(port))).await;
    delivers_each_mail_once_over_tls_as_the_login(f, "fay").await;
}

/// Posts orders of `user`; each event's mail arrives once (its Message-ID
/// the row's), over TLS, from the test's login; the server saw AUTH only
/// over TLS, and the password is in no role's log.
async fn delivers_each_mail_once_over_tls_as_the_login(mut f: Fixture, user: &str) {
    let orders = f.post_orders(user, 3).await;
    let rows = f.until_delivered(2 * orders.len()).await;
    let mails = f.mails();
    check_mails_name_their_orders(&rows, &orders, user);
    let copies = check_every_row_arrived(&rows, &mails);
    assert!(
        copies.values().all(|&n| n == 1) && mails.len() == rows.len(),
        "each mail once: {copies:?}"
    );
    for mail in &mails {
        assert!(
            mail.tls && mail.login.as_deref() == Some(USER),
            "a mail arrived unencrypted or unauthenticated: {mail:#?}"
        );
    }
    let events = read_events(&f.mailbox);
    let auths: Vec<&Event> = events.iter().filter(|e| e.event == "auth").collect();
    assert!(
        !auths.is_empty()
            && auths
                .iter()
                .all(|e| e.tls && e.accepted == Some(true) && e.login.as_deref() == Some(USER)),
        "AUTH over TLS, accepted: {events:#?}"
    );
    let in_clear: Vec<&Event> = events
        .iter()
        .filter(|e| e.event != "ehlo" && !e.tls)
        .collect();
    assert!(in_clear.is_empty(), "commands in the clear: {in_clear:#?}");
    check_no_log_has_the_password(&f);
}

/// `tls=required` to a plain server that offers AUTH in the clear: the
/// mailer sends neither the password nor a mail, and the mails wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_offering_no_starttls_gets_no_mail_and_no_password_under_tls_required() {
    let ca = TestCa::new("smtp_no_starttls");
    // Plain SMTP that offers AUTH in the clear: it would take the password.
    let behaviour = Behaviour {
        auth: Some((USER.into(), PASSWORD.into())),
        auth_without_tls: true,
        ..Behaviour::default()
    };
    let url = |port| format!("smtp://{USER}:{PASSWORD}@127.0.0.1:{port}?tls=required");
    let mut f = Fixture::start_with("no_starttls", behaviour.clone(), false, |port| {
        mailer_env(&ca, url(port))
    })
    .await;
    f.start_smtp(behaviour);
    let events = mails_wait_unsent(&mut f, "gus", "STARTTLS").await;
    let sent: Vec<&Event> = events.iter().filter(|e| e.event != "ehlo").collect();
    assert!(
        sent.is_empty(),
        "the server got AUTH or MAIL without TLS: {sent:#?}"
    );
}

/// A server whose certificate no trusted CA signed (`SMTP_CA_FILE` unset):
/// the handshake fails, no AUTH or MAIL reaches it, and the mails wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_untrusted_certificate_gets_no_password_and_the_mails_wait() {
    let ca = TestCa::new("smtp_untrusted");
    let url = |port| format!("smtp://{USER}:{PASSWORD}@127.0.0.1:{port}?tls=required");
    let behaviour = tls_server(&ca, false);
    let mut f = Fixture::start_with("untrusted", behaviour.clone(), false, |port| {
        vec![("SMTP_URL", url(port))]
    })
    .await;
    f.start_smtp(behaviour);
    let events = mails_wait_unsent(&mut f, "hal", "certificate").await;
    let sent: Vec<&Event> = events.iter().filter(|e| e.event != "ehlo").collect();
    assert!(sent.is_empty(), "the server got AUTH or MAIL: {sent:#?}");
}

/// A password the server refuses (535) is retried, never given up: the
/// other mails of the outbox must not be lost to a fixable setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_retried_never_given_up() {
    let ca = TestCa::new("smtp_refused_login");
    let url = |port| format!("smtp://{USER}:not-the-password@127.0.0.1:{port}?tls=required");
    let behaviour = tls_server(&ca, false);
    let mut f = Fixture::start_with("refused_login", behaviour.clone(), false, |port| {
        mailer_env(&ca, url(port))
    })
    .await;
    f.start_smtp(behaviour);
    let events = mails_wait_unsent(&mut f, "ida", "535").await;
    let auths: Vec<&Event> = events.iter().filter(|e| e.event == "auth").collect();
    assert!(
        !auths.is_empty()
            && auths
                .iter()
                .all(|e| e.tls && e.accepted == Some(false) && e.login.as_deref() == Some(USER)),
        "the login refused, over TLS: {events:#?}"
    );
    let mails: Vec<&Event> = events
        .iter()
        .filter(|e| e.event == "mail_command")
        .collect();
    assert!(mails.is_empty(), "MAIL without a login: {mails:#?}");
}

/// Posts two orders of `user`, waits until each of their mails was tried
/// at least twice and failed with an error containing `error`; checks that
/// none was sent or given up, that nothing arrived and that no role logged
/// the password. Returns what the server recorded of its clients.
async fn mails_wait_unsent(f: &mut Fixture, user: &str, error: &str) -> Vec<Event> {
    let orders = f.post_orders(user, 2).await;
    let total = 2 * orders.len();
    let (pool, mailbox) = (f.pool.clone(), f.mailbox.clone());
    let rows = f
        .until(
            "each order's first mail tried twice, refused",
            SETTLE,
            async || {
                let rows = mail_rows(&pool).await;
                let (first, _) = first_of_each_order(&rows);
                let retried = first
                    .iter()
                    .filter(|r| r.attempts >= 2 && r.last_error.is_some())
                    .count();
                let ehlos = read_events(&mailbox)
                    .iter()
                    .filter(|e| e.event == "ehlo")
                    .count();
                if rows.len() == total && retried == orders.len() && ehlos >= orders.len() {
                    Ok(rows)
                } else {
                    Err(format!(
                        "{retried} of {} first rows retried, {ehlos} EHLOs: {rows:#?}",
                        first.len()
                    ))
                }
            },
        )
        .await;
    // An order's second mail waits, untried, behind its first.
    let (first, waiting) = first_of_each_order(&rows);
    for row in first {
        let last_error = row.last_error.as_deref().unwrap_or_default();
        assert!(
            !row.published && !row.given_up && last_error.contains(error),
            "refused ({error}), still pending: {row:#?}"
        );
    }
    for row in waiting {
        assert!(
            !row.published && row.attempts == 0 && row.last_error.is_none(),
            "waiting behind its order's first mail: {row:#?}"
        );
    }
    eprintln!(
        "{user}: last_error = {:?}",
        rows[0].last_error.as_deref().unwrap_or_default()
    );
    assert!(f.mails().is_empty(), "a mail arrived: {:#?}", f.mails());
    check_no_log_has_the_password(f);
    read_events(&f.mailbox)
}

fn check_no_log_has_the_password(f: &Fixture) {
    for role in Role::ALL {
        assert!(
            !f.stack.processes.log(role).contains(PASSWORD),
            "the password is in the {} log",
            role.label()
        );
    }
}
