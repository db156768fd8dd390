use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

use super::*;

fn closed_with(kind: AMQPErrorKind, text: &str) -> lapin::Error {
    ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
}

fn io(kind: std::io::ErrorKind) -> lapin::Error {
    std::io::Error::new(kind, "test").into()
}

#[test]
fn refusals_stop_and_outages_are_waited_for() {
    let refused = [
        closed_with(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "login refused",
        ),
        closed_with(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "vhost x not found",
        ),
        io(std::io::ErrorKind::InvalidData),
    ];
    for error in &refused {
        assert!(classify("u", error).is_permanent(), "{error}");
    }
    let outages = [
        // A vhost the broker is still starting, or restarting.
        closed_with(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "vhost x is down",
        ),
        closed_with(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "shutdown",
        ),
        io(std::io::ErrorKind::ConnectionRefused),
        io(std::io::ErrorKind::ConnectionReset),
    ];
    for error in &outages {
        assert!(!classify("u", error).is_permanent(), "{error}");
    }
}

#[test]
fn the_start_check_stops_on_a_cert_wanted_close_only_when_it_repeats() {
    let wanted = || ConnectError::ClientCertWanted("u: closed".into());
    let check = StartCheck::default();
    // A node restarting: dropped once, then down, then dropped again.
    assert!(!check.stops_on(&wanted()));
    assert!(!check.stops_on(&ConnectError::Unreachable("u: refused".into())));
    assert!(!check.stops_on(&wanted()));
    assert!(!check.stops_on(&wanted()));
    // The third in a row is the refusal of a broker that wants one.
    assert!(check.stops_on(&wanted()));
    // A refusal stops at once.
    let check = StartCheck::default();
    assert!(check.stops_on(&ConnectError::Refused("u: 403".into())));
}
